//! `storage-agent ctl`: the daemon's manager API, client API and gRPC from the command line,
//! with the config file (and so the generated secrets) the daemon uses. Human tables by
//! default, `--json` for scripts; exit codes in `out::exit`.

mod conn;
mod out;
mod transfer;
mod upload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{Value, json};

use conn::{Conn, Overrides, status};
use out::{CtlError, Out, Result, size, table};

#[derive(Args)]
pub struct CtlArgs {
    /// The daemon's config file (as for `serve`).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout; errors as JSON on stderr.
    #[arg(long, global = true)]
    json: bool,
    /// Manager API URL (default: where the daemon said it listens, else the config).
    #[arg(long, global = true, env = "STORAGE_AGENT_MANAGER_URL")]
    manager: Option<String>,
    /// Client API URL.
    #[arg(long, global = true, env = "STORAGE_AGENT_CLIENT_URL")]
    client: Option<String>,
    /// gRPC URL of the storage agent.
    #[arg(long, global = true, env = "STORAGE_AGENT_RPC_URL")]
    rpc: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Volumes and what they can do.
    Volumes,
    /// Quota scopes.
    Scope {
        #[command(subcommand)]
        command: ScopeCommand,
    },
    /// Vfolders.
    Folder {
        #[command(subcommand)]
        command: FolderCommand,
    },
    /// Lists a directory of a vfolder.
    Ls {
        volume: String,
        vfid: String,
        #[arg(default_value = ".")]
        path: String,
    },
    /// Uploads files or directories (resumable: run it again after an interruption).
    Upload {
        volume: String,
        vfid: String,
        /// Local files or directories.
        #[arg(required = true)]
        local: Vec<PathBuf>,
        /// Directory of the vfolder to upload into.
        #[arg(long, default_value = ".")]
        to: String,
        /// Bytes per PATCH (each checksummed): the most an interruption loses.
        #[arg(long, default_value = "16m", value_parser = parse_size)]
        chunk: u64,
        /// Partial uploads sent at once for each file of 64 MiB or more (tus concatenation;
        /// 1 sends one stream).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=16))]
        streams: u64,
    },
    /// Downloads a file or a directory (resumable).
    Download {
        volume: String,
        vfid: String,
        remote: String,
        #[arg(default_value = ".")]
        local: PathBuf,
    },
    /// A client-API URL with a fresh token, for other clients (curl, tus clients, browsers).
    Url {
        kind: UrlKind,
        volume: String,
        vfid: String,
        path: String,
        /// The upload's length (uploads only).
        #[arg(long)]
        size: Option<u64>,
    },
    /// SFTP and file browser sessions.
    Session {
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// How many more sessions this node can host.
    Capacity,
}

#[derive(Subcommand)]
enum ScopeCommand {
    Create {
        volume: String,
        /// user:<uuid> or project:<uuid>
        qsid: String,
        #[arg(long, value_parser = parse_size)]
        limit: Option<u64>,
    },
    Show {
        volume: String,
        qsid: String,
    },
    List {
        volume: String,
    },
    Delete {
        volume: String,
        qsid: String,
    },
}

#[derive(Subcommand)]
enum FolderCommand {
    /// Creates a vfolder; without a vfid, a new one in `--scope` (a new user scope if absent).
    Create {
        volume: String,
        vfid: Option<String>,
        #[arg(long)]
        scope: Option<String>,
    },
    List {
        volume: String,
        /// A quota scope's UUID.
        #[arg(long)]
        scope: Option<String>,
    },
    Usage {
        volume: String,
        vfid: String,
    },
    /// Deletes a vfolder and waits for it.
    Delete {
        volume: String,
        vfid: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum UrlKind {
    Upload,
    Download,
}

#[derive(Clone, Copy, ValueEnum)]
enum SessionKindArg {
    Sftp,
    Filebrowser,
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Starts a session; prints its endpoint, credentials and the CA to trust.
    Create {
        kind: SessionKindArg,
        /// The user's UUID (their quota scope holds the vfolders).
        #[arg(long)]
        user: String,
        /// VOLUME:VFID[:NAME[:ro]], repeatable.
        #[arg(long = "mount", required = true)]
        mounts: Vec<String>,
        /// An OpenSSH public key file (SFTP), repeatable.
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// Also generate a password (always on for the file browser).
        #[arg(long)]
        password: bool,
        /// How long the session lives, in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// Where to write the CA certificate to trust (file browser).
        #[arg(long)]
        ca_out: Option<PathBuf>,
    },
    List,
    Destroy {
        id: String,
    },
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    crate::config::parse_size(s).ok_or_else(|| format!("{s:?} is not a size like 16m or 1048576"))
}

pub fn run(args: CtlArgs) -> ExitCode {
    let out = Out { json: args.json };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let overrides = Overrides {
        config: args.config.clone(),
        manager: args.manager.clone(),
        client: args.client.clone(),
        rpc: args.rpc.clone(),
        ..Default::default()
    };
    let result = rt.block_on(async {
        let conn = Conn::open(overrides)?;
        tokio::select! {
            r = dispatch(&conn, &out, args.command) => r,
            _ = tokio::signal::ctrl_c() => Err(CtlError::interrupted(
                "interrupted; run the same command again to resume",
            )),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::from(e.code)
        }
    }
}

async fn dispatch(conn: &Conn, out: &Out, command: CtlCommand) -> Result<()> {
    match command {
        CtlCommand::Volumes => {
            let v = conn.mgr(Method::GET, "/volumes", Value::Null).await?;
            out.value(&v, |v| {
                let rows: Vec<Vec<String>> = v["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            x["name"].as_str().unwrap_or("").into(),
                            x["backend"].as_str().unwrap_or("").into(),
                            x["path"].as_str().unwrap_or("").into(),
                            x["capabilities"]
                                .as_array()
                                .map(|c| {
                                    c.iter()
                                        .filter_map(|s| s.as_str())
                                        .collect::<Vec<_>>()
                                        .join(",")
                                })
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(&["VOLUME", "BACKEND", "PATH", "CAPABILITIES"], &rows);
            });
        }
        CtlCommand::Scope { command } => scope(conn, out, command).await?,
        CtlCommand::Folder { command } => folder(conn, out, command).await?,
        CtlCommand::Ls { volume, vfid, path } => {
            let v = conn
                .mgr(
                    Method::POST,
                    "/folder/file/list",
                    json!({"volume": volume, "vfid": vfid, "relpath": path}),
                )
                .await?;
            out.value(&v, |v| {
                let rows: Vec<Vec<String>> = v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        vec![
                            i["type"].as_str().unwrap_or("").to_lowercase(),
                            size(i["stat"]["size"].as_u64().unwrap_or(0)),
                            i["stat"]["modified"].as_str().unwrap_or("").into(),
                            i["name"].as_str().unwrap_or("").into(),
                        ]
                    })
                    .collect();
                table(&["TYPE", "SIZE", "MODIFIED", "NAME"], &rows);
            });
        }
        CtlCommand::Upload {
            volume,
            vfid,
            local,
            to,
            chunk,
            streams,
        } => {
            let up = upload::Upload {
                conn,
                volume: &volume,
                vfid: &vfid,
                to: &to,
                chunk: chunk.max(1),
                streams,
                quiet: out.json,
            };
            let mut all = Vec::new();
            for l in &local {
                all.push(up.run(l).await?);
            }
            let v = json!({"results": all});
            out.value(&v, |v| {
                for r in v["results"].as_array().into_iter().flatten() {
                    for f in r["uploaded"].as_array().into_iter().flatten() {
                        println!(
                            "uploaded {} ({})",
                            f["path"].as_str().unwrap_or(""),
                            size(f["size"].as_u64().unwrap_or(0))
                        );
                    }
                }
            });
        }
        CtlCommand::Download {
            volume,
            vfid,
            remote,
            local,
        } => {
            let down = transfer::Download {
                conn,
                volume: &volume,
                vfid: &vfid,
                quiet: out.json,
            };
            let v = down.run(&remote, &local).await?;
            out.value(&v, |v| {
                for f in v["downloaded"].as_array().into_iter().flatten() {
                    println!(
                        "downloaded {} -> {} ({})",
                        f["path"].as_str().unwrap_or(""),
                        f["to"].as_str().unwrap_or(""),
                        size(f["size"].as_u64().unwrap_or(0))
                    );
                }
            });
        }
        CtlCommand::Url {
            kind,
            volume,
            vfid,
            path,
            size,
        } => {
            let (route, body, client_path) = match kind {
                UrlKind::Upload => {
                    let size = size.ok_or_else(|| {
                        CtlError::usage("an upload URL needs --size (the upload's length)")
                    })?;
                    (
                        "/folder/file/upload",
                        json!({"volume": volume, "vfid": vfid, "relpath": path, "size": size}),
                        "/upload",
                    )
                }
                UrlKind::Download => (
                    "/folder/file/download",
                    json!({"volume": volume, "vfid": vfid, "relpath": path}),
                    "/download",
                ),
            };
            let t = conn.mgr(Method::POST, route, body).await?;
            let url = format!(
                "{}{client_path}?token={}",
                conn.client,
                t["token"].as_str().unwrap_or_default()
            );
            out.value(&json!({"url": url}), |_| println!("{url}"));
        }
        CtlCommand::Session { command } => session(conn, out, command).await?,
        CtlCommand::Capacity => {
            let mut rpc = conn.rpc().await?;
            let c = rpc
                .get_capacity(crate::pb::GetCapacityRequest::default())
                .await
                .map_err(status)?
                .into_inner();
            let v = json!({
                "node_id": c.node_id,
                "max_containers": c.max_containers,
                "running": c.running,
                "starting": c.starting,
                "available": c.available,
            });
            out.value(&v, |v| {
                table(
                    &["NODE", "MAX", "RUNNING", "STARTING", "AVAILABLE"],
                    &[[
                        "node_id",
                        "max_containers",
                        "running",
                        "starting",
                        "available",
                    ]
                    .iter()
                    .map(|k| match &v[*k] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect()],
                );
            });
        }
    }
    Ok(())
}

async fn scope(conn: &Conn, out: &Out, command: ScopeCommand) -> Result<()> {
    match command {
        ScopeCommand::Create {
            volume,
            qsid,
            limit,
        } => {
            let mut body = json!({"volume": volume, "qsid": qsid});
            if let Some(l) = limit {
                body["options"] = json!({"limit_bytes": l});
            }
            conn.mgr(Method::POST, "/quota-scope", body).await?;
            out.value(&json!({"qsid": qsid, "created": true}), |_| {
                println!("created quota scope {qsid}")
            });
        }
        ScopeCommand::Show { volume, qsid } => {
            let v = conn
                .mgr(
                    Method::GET,
                    "/quota-scope",
                    json!({"volume": volume, "qsid": qsid}),
                )
                .await?;
            out.value(&v, |v| {
                let show = |k: &str| v[k].as_u64().map(size).unwrap_or_else(|| "-".into());
                table(
                    &["QUOTA SCOPE", "USED", "LIMIT"],
                    &[vec![qsid.clone(), show("used_bytes"), show("limit_bytes")]],
                );
            });
        }
        ScopeCommand::List { volume } => {
            let v = conn
                .mgr(Method::GET, "/quota-scopes", json!({"volume": volume}))
                .await?;
            out.value(&v, |v| {
                let rows: Vec<Vec<String>> = v["quota_scopes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|q| vec![q.as_str().unwrap_or("").to_string()])
                    .collect();
                table(&["QUOTA SCOPE (uuid)"], &rows);
            });
        }
        ScopeCommand::Delete { volume, qsid } => {
            conn.mgr(
                Method::DELETE,
                "/quota-scope",
                json!({"volume": volume, "qsid": qsid}),
            )
            .await?;
            out.value(&json!({"qsid": qsid, "deleted": true}), |_| {
                println!("deleted quota scope {qsid}")
            });
        }
    }
    Ok(())
}

async fn folder(conn: &Conn, out: &Out, command: FolderCommand) -> Result<()> {
    match command {
        FolderCommand::Create {
            volume,
            vfid,
            scope,
        } => {
            let vfid = match vfid {
                Some(v) => v,
                None => {
                    let qs = scope.unwrap_or_else(|| format!("user:{}", uuid::Uuid::new_v4()));
                    format!("{qs}/{}", uuid::Uuid::new_v4().simple())
                }
            };
            conn.mgr(
                Method::POST,
                "/folder/create",
                json!({"volume": volume, "vfid": vfid}),
            )
            .await?;
            out.value(&json!({"vfid": vfid}), |_| println!("{vfid}"));
        }
        FolderCommand::List { volume, scope } => {
            let mut body = json!({"volume": volume});
            if let Some(s) = scope {
                body["quota_scope"] = json!(s);
            }
            let v = conn.mgr(Method::GET, "/folders", body).await?;
            out.value(&v, |v| {
                let rows: Vec<Vec<String>> = v["vfolders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| {
                        vec![
                            f["quota_scope"].as_str().unwrap_or("").into(),
                            f["folder"].as_str().unwrap_or("").into(),
                        ]
                    })
                    .collect();
                table(&["QUOTA SCOPE (uuid)", "FOLDER"], &rows);
            });
        }
        FolderCommand::Usage { volume, vfid } => {
            let v = conn
                .mgr(
                    Method::GET,
                    "/folder/usage",
                    json!({"volume": volume, "vfid": vfid}),
                )
                .await?;
            out.value(&v, |v| {
                table(
                    &["VFOLDER", "FILES", "USED"],
                    &[vec![
                        vfid.clone(),
                        v["file_count"].to_string(),
                        size(v["used_bytes"].as_u64().unwrap_or(0)),
                    ]],
                );
            });
        }
        FolderCommand::Delete { volume, vfid } => {
            let v = conn
                .mgr(
                    Method::POST,
                    "/folder/delete",
                    json!({"volume": volume, "vfid": vfid}),
                )
                .await?;
            let id = v["bgtask_id"].as_str().unwrap_or_default().to_string();
            let pb = transfer::bar(0, out.json);
            pb.set_message(format!("deleting {vfid}"));
            let t = conn.wait_task(&id, &pb).await?;
            pb.finish_and_clear();
            if t["status"] != "done" {
                return Err(CtlError::unavailable(format!(
                    "deleting {vfid}: {}",
                    t["error"].as_str().unwrap_or("the task failed")
                )));
            }
            out.value(&t, |_| println!("deleted {vfid}"));
        }
    }
    Ok(())
}

fn session_json(s: &crate::pb::Session) -> Value {
    json!({
        "id": s.id,
        "kind": if s.kind == crate::pb::SessionKind::Sftp as i32 { "sftp" } else { "filebrowser" },
        // "running", not the proto's SESSION_STATE_RUNNING.
        "state": crate::pb::SessionState::try_from(s.state)
            .map(|x| x.as_str_name().trim_start_matches("SESSION_STATE_").to_lowercase())
            .unwrap_or_default(),
        "user_id": s.user_id,
        "username": s.username,
        "endpoints": s.endpoints.iter().map(|e| json!({"protocol": e.protocol, "url": e.url, "port": e.port})).collect::<Vec<_>>(),
        "host_key_fingerprints": s.host_key_fingerprints,
    })
}

async fn session(conn: &Conn, out: &Out, command: SessionCommand) -> Result<()> {
    let mut rpc = conn.rpc().await?;
    match command {
        SessionCommand::Create {
            kind,
            user,
            mounts,
            keys,
            password,
            ttl,
            ca_out,
        } => {
            let mut pm = Vec::new();
            for m in &mounts {
                // VOLUME:VFID holds a ':' of its own (user:<uuid>/<folder>).
                let (volume, rest) = m.split_once(':').ok_or_else(|| {
                    CtlError::usage(format!("--mount {m:?}: VOLUME:VFID[:NAME[:ro]]"))
                })?;
                let mut tail = rest.splitn(3, ':');
                let (kind_part, id_part) = (tail.next(), tail.next());
                let vfid = match (kind_part, id_part) {
                    (Some(k), Some(i)) => format!("{k}:{i}"),
                    _ => {
                        return Err(CtlError::usage(format!(
                            "--mount {m:?}: VOLUME:VFID[:NAME[:ro]]"
                        )));
                    }
                };
                let extra: Vec<&str> = tail
                    .next()
                    .map(|t| t.split(':').collect())
                    .unwrap_or_default();
                let read_only = extra.last() == Some(&"ro");
                let name = extra
                    .first()
                    .filter(|n| **n != "ro")
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| {
                        vfid.rsplit('/')
                            .next()
                            .unwrap_or("data")
                            .chars()
                            .take(8)
                            .collect()
                    });
                pm.push(crate::pb::Mount {
                    volume: volume.to_string(),
                    vfid,
                    name,
                    subpath: String::new(),
                    read_only,
                });
            }
            let mut public_keys = Vec::new();
            for k in &keys {
                public_keys.push(
                    std::fs::read_to_string(k)
                        .map_err(|e| CtlError::usage(format!("{}: {e}", k.display())))?,
                );
            }
            let req = crate::pb::CreateSessionRequest {
                kind: match kind {
                    SessionKindArg::Sftp => crate::pb::SessionKind::Sftp as i32,
                    SessionKindArg::Filebrowser => crate::pb::SessionKind::Filebrowser as i32,
                },
                user_id: user,
                access_key: "storage-agent-ctl".into(),
                mounts: pm,
                credentials: Some(crate::pb::Credentials {
                    public_keys,
                    generate_password: password,
                }),
                ttl_seconds: ttl.unwrap_or(0),
                ..Default::default()
            };
            let created = rpc.create_session(req).await.map_err(status)?.into_inner();
            let s = created.session.unwrap_or_default();
            let ca = created.ca_cert_pem.clone();
            if let (Some(path), false) = (&ca_out, ca.is_empty()) {
                crate::private_file::write(path, ca.as_bytes())
                    .map_err(|e| CtlError::usage(format!("{}: {e}", path.display())))?;
            }
            let mut v = session_json(&s);
            v["password"] = json!(created.password);
            v["ca_certificate_pem"] = json!(ca);
            out.value(&v, |v| {
                println!("session   {}", v["id"].as_str().unwrap_or(""));
                for e in v["endpoints"].as_array().into_iter().flatten() {
                    println!("endpoint  {}", e["url"].as_str().unwrap_or(""));
                }
                println!("user      {}", v["username"].as_str().unwrap_or(""));
                if let Some(p) = v["password"].as_str().filter(|p| !p.is_empty()) {
                    println!("password  {p}   (shown once)");
                }
                for f in v["host_key_fingerprints"].as_array().into_iter().flatten() {
                    println!("host key  {}", f.as_str().unwrap_or(""));
                }
                match (&ca_out, ca.is_empty()) {
                    (Some(p), false) => println!("CA        written to {}", p.display()),
                    (None, false) => println!("CA to trust:\n{ca}"),
                    _ => {}
                }
            });
        }
        SessionCommand::List => {
            let list = rpc
                .list_sessions(crate::pb::ListSessionsRequest::default())
                .await
                .map_err(status)?
                .into_inner();
            let v = json!({"sessions": list.sessions.iter().map(session_json).collect::<Vec<_>>()});
            out.value(&v, |v| {
                let rows: Vec<Vec<String>> = v["sessions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        vec![
                            s["id"].as_str().unwrap_or("").into(),
                            s["kind"].as_str().unwrap_or("").into(),
                            s["state"].as_str().unwrap_or("").into(),
                            s["user_id"].as_str().unwrap_or("").into(),
                            s["endpoints"][0]["url"].as_str().unwrap_or("").into(),
                        ]
                    })
                    .collect();
                table(&["SESSION", "KIND", "STATE", "USER", "ENDPOINT"], &rows);
            });
        }
        SessionCommand::Destroy { id } => {
            let s = rpc
                .destroy_session(crate::pb::DestroySessionRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            let v = session_json(&s);
            out.value(&v, |v| {
                println!(
                    "{} {}",
                    v["id"].as_str().unwrap_or(""),
                    v["state"].as_str().unwrap_or("")
                )
            });
        }
    }
    Ok(())
}
