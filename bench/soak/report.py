"""The soak's report: a summary (operations and errors by kind, faults, invariants, leftovers,
resource slopes against what is accepted) in Markdown, and a plot (SVG, no plotting library)
of RSS, fds, threads, tokio tasks and p99 latency over time with the faults marked."""

import datetime
import html
import platform
from collections import Counter

# Growth accepted after warm-up, per minute, per daemon process (within one run of it: a
# restart starts again from nothing). Above these an hour adds more than an operator would
# shrug off: 60 MiB of RSS, 12 fds or threads, 4 MiB of SQLite.
# heap_mib is what the allocator has handed out and not got back (the daemon's
# storage_agent_heap_bytes{state="in_use"}): a leak grows it; memory the allocator keeps for
# reuse grows only RSS.
ACCEPTED = {"rss_mib": 1.0, "heap_mib": 1.0, "fds": 0.2, "threads": 0.2, "tasks": 1.0, "sqlite_kib": 64.0}
UNITS = {"rss_mib": "MiB", "heap_mib": "MiB", "fds": "fds", "threads": "threads", "tasks": "tasks",
         "sqlite_kib": "KiB"}
# A segment shorter than this says nothing about a slope (the smoke's are).
MIN_SEGMENT_S = 600
# A restarted node warms up for minutes, not seconds: glibc's arenas (one per thread that
# allocates) fill as the mixed load reaches every thread, and pools of connections and files
# grow to what the load needs. In two hour-long runs (bench/SOAK.md) RSS rose for 10-15 minutes
# to a plateau (~95 MiB at 3 min, 110-120 from 15 on) and fds for about 10, while the heap in use
# was flat from the second minute; a 2-minute warm-up judged that rise as growth on lifetimes
# of 12-17 minutes and as flat on every longer one. Lifetimes shorter than warm-up plus
# MIN_SEGMENT_S are not judged.
WARMUP_S = 600


def slope(points):
    n = len(points)
    if n < 3:
        return None
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return None if den == 0 else sum((t - mx) * (v - my) for t, v in points) / den


def segments(samples, node, key):
    """The samples of one process lifetime each, without its warm-up."""
    out, cur, last = [], [], None
    for s in samples:
        if f"{node}.{key}" not in s:
            continue
        r = s.get(f"{node}.restarts", 0)
        if r != last:
            if cur:
                out.append(cur)
            cur, last, start = [], r, s["t"]
        if s["t"] - start >= WARMUP_S:
            cur.append((s["t"], s[f"{node}.{key}"]))
    if cur:
        out.append(cur)
    return out


class Report:
    def __init__(self, soak):
        self.s = soak
        self.rec = soak.rec

    def slopes(self):
        """{(node, key): (per-minute slope, minutes measured)} over the long segments."""
        out = {}
        for n in self.s.nodes:
            for key in ACCEPTED:
                worst, minutes = None, 0
                for seg in segments(self.s.samples, n.name, key):
                    if seg and seg[-1][0] - seg[0][0] >= MIN_SEGMENT_S:
                        k = slope(seg)
                        if k is not None:
                            worst = k * 60 if worst is None else max(worst, k * 60)
                            minutes += (seg[-1][0] - seg[0][0]) / 60
                out[(n.name, key)] = (worst, minutes)
        return out

    def write(self, path):
        rec, s = self.rec, self.s
        ops = Counter(op[1] for op in rec.ops)
        outcomes = Counter((op[1], op[3]) for op in rec.ops if op[3] != "ok")
        lines = [
            f"# Soak: {'smoke, ' if s.smoke else ''}{(rec.ops[-1][0] if rec.ops else 0) / 60:.0f} minutes",
            "",
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
            f"`bench/soak/soak.py{' --smoke' if s.smoke else f' --minutes {s.args.minutes:g}'}` "
            f"({s.args.sa_bin.rsplit('/', 2)[-2]} build). Two nodes sharing a Redis Sentinel group found through "
            "etcd, moto for S3, Docker for sessions; each node's state directory on a 256 MiB ext4 of its own.",
            "",
            f"![RSS, fds, threads, tasks and p99 latency over time, faults marked]({path.with_suffix('.svg').name})",
            "",
            "## Invariants",
            "",
        ]
        if rec.violations:
            lines += [f"**{len(rec.violations)} broken:**", ""]
            lines += [f"- {t:.0f} s: {html.escape(v)}" for t, v in rec.violations[:60]]
        else:
            lines += ["All held: no acknowledged byte lost (HEAD after every interruption), every completed "
                      "upload byte-identical when read back (sha256, once after it completed and again at the "
                      "end), every range and archive member equal to what was sent, the limit user never "
                      "running more than one session on the two nodes together, every error a client saw a "
                      "documented one (problem+json or a gRPC status), no call without an answer within "
                      f"{150} s, nothing left over after the grace."]
        lines += ["", "## Faults", "", "| # | at | took | fault |", "|---|---|---|---|"]
        for i, (t0, t1, name) in enumerate(rec.faults, 1):
            lines.append(f"| {i} | {t0:.0f} s | {(t1 or t0) - t0:.0f} s | {name} |")
        lines += ["", "## Operations", "", "| operation | count | p50 | p99 | not ok (by outcome) |", "|---|---|---|---|---|"]
        for kind, n in sorted(ops.items()):
            lat = sorted(op[2] for op in rec.ops if op[1] == kind and op[3] == "ok")
            p = (lambda q: f"{lat[min(len(lat) - 1, int(len(lat) * q))] * 1000:.0f} ms" if lat else "-")
            bad = ", ".join(f"{o}: {c}" for (k, o), c in sorted(outcomes.items()) if k == kind)
            lines.append(f"| {kind} | {n} | {p(0.5)} | {p(0.99)} | {bad} |")
        lines += ["", "## Left over after the grace", ""]
        lines += [f"- {k}: {v}" for k, v in getattr(s, "checks", {}).items()]
        lines += ["", "## Resources", "",
                  f"Slopes by least squares within each process lifetime, after its first {WARMUP_S} s, over "
                  f"lifetimes of at least {MIN_SEGMENT_S // 60} min (the worst lifetime shown). Accepted: "
                  + ", ".join(f"{v:g} {UNITS[k]}/min" for k, v in ACCEPTED.items()) + ".", "",
                  "| node | resource | first | last | max | slope /min | measured over | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        ok = not rec.violations
        for (node, key), (k, minutes) in self.slopes().items():
            vals = [x[f"{node}.{key}"] for x in s.samples if f"{node}.{key}" in x]
            if not vals:
                continue
            if k is None:
                verdict = "too short to tell"
            elif k <= ACCEPTED[key]:
                verdict = "flat"
            else:
                verdict = "**grows**"
                ok = ok and s.smoke  # the smoke's segments are too short to judge
            lines.append(f"| {node} | {key} | {vals[0]:.0f} | {vals[-1]:.0f} | {max(vals):.0f} | "
                         f"{'-' if k is None else f'{k:+.3f}'} | {minutes:.0f} min | {verdict} |")
        lines += ["", "Restarts: " + ", ".join(f"{n.name} {n.restarts}" for n in s.nodes), ""]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        path.with_suffix(".svg").write_text(self.svg())
        return ok

    def svg(self):
        s, rec = self.s, self.rec
        samples = s.samples
        if not samples:
            return '<svg xmlns="http://www.w3.org/2000/svg"/>'
        t_end = max(x["t"] for x in samples) or 1
        kinds = ["tus PATCH", "download range", "mint upload token", "sftp session create", "folder create"]
        panels = [
            ("RSS and heap in use (MiB)", [(f"{n.name}.rss_mib", f"node {n.name} RSS") for n in s.nodes]
             + [(f"{n.name}.heap_mib", f"node {n.name} heap") for n in s.nodes]),
            ("open fds", [(f"{n.name}.fds", f"node {n.name}") for n in s.nodes]),
            ("threads", [(f"{n.name}.threads", f"node {n.name}") for n in s.nodes]),
            ("tokio tasks", [(f"{n.name}.tasks", f"node {n.name}") for n in s.nodes]),
            ("p99 latency, 30 s windows (s)", [(f"p99.{k}", k) for k in kinds]),
        ]
        colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
        W, H, L, R, top = 1000, 150, 70, 200, 30
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{top + len(panels) * (H + 30) + 20}" '
               'font-family="sans-serif" font-size="11">',
               '<rect width="100%" height="100%" fill="white"/>',
               f'<text x="{L}" y="18" font-size="13">storage-agent soak: {t_end / 60:.0f} min; faults numbered as in the '
               'report</text>']
        pw = W - L - R
        for i, (title, series) in enumerate(panels):
            y0 = top + i * (H + 30)
            vals = [x[k] for k, _ in series for x in samples if k in x]
            vmax = max(vals) * 1.1 if vals and max(vals) > 0 else 1
            out.append(f'<text x="{L}" y="{y0 + 10}" font-weight="bold">{html.escape(title)}</text>')
            out.append(f'<rect x="{L}" y="{y0 + 14}" width="{pw}" height="{H - 14}" fill="none" stroke="#999"/>')
            ys = lambda v: y0 + H - (v / vmax) * (H - 16)  # noqa: E731
            xs = lambda t: L + t / t_end * pw  # noqa: E731
            out.append(f'<text x="{L - 4}" y="{y0 + 20}" text-anchor="end">{vmax:.3g}</text>')
            out.append(f'<text x="{L - 4}" y="{y0 + H}" text-anchor="end">0</text>')
            for j, (t0, t1, name) in enumerate(rec.faults, 1):
                x = xs(t0)
                w = max(1.0, xs(t1 or t0) - x)
                out.append(f'<rect x="{x:.1f}" y="{y0 + 14}" width="{w:.1f}" height="{H - 14}" fill="#fdd" opacity="0.6">'
                           f'<title>{html.escape(name)}</title></rect>')
                out.append(f'<text x="{x + 1:.1f}" y="{y0 + 24}" fill="#a00">{j}</text>')
            for c, (key, label) in enumerate(series):
                pts = [(xs(x["t"]), ys(x[key])) for x in samples if key in x]
                if pts:
                    d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
                    out.append(f'<polyline fill="none" stroke="{colors[c % 5]}" stroke-width="1.2" points="{d}"/>')
                out.append(f'<text x="{L + pw + 10}" y="{y0 + 28 + c * 14}" fill="{colors[c % 5]}">{html.escape(label)}</text>')
        y = top + len(panels) * (H + 30)
        out.append(f'<text x="{L}" y="{y}">time: 0 to {t_end / 60:.1f} min</text>')
        out.append("</svg>")
        return "\n".join(out)
