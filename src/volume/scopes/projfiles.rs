//! `projects` and `projid` (normally in `/etc`): the XFS project files that `xfs_quota` reads to
//! name projects, and that the Python storage proxy keeps. The kernel and our database are what
//! count; these files are kept only when an operator asks (`[volume.<name>] project-files`), so
//! `xfs_quota -x -c 'report -p'` shows scopes by name and a node can go back to the Python proxy.
//! Lines are the Python proxy's: `<id>:<scope path>` in `projects`, `<scope dir name>:<id>` in
//! `projid`.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One writer at a time per process (every volume of the daemon may share the files); files
/// are replaced whole by rename, so readers never see half a file.
static LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone)]
pub struct ProjectFiles {
    dir: PathBuf,
}

impl ProjectFiles {
    pub fn new(dir: PathBuf) -> Self {
        ProjectFiles { dir }
    }

    pub fn projid(&self) -> PathBuf {
        self.dir.join("projid")
    }

    /// Records project `id` as `name`, a directory at `path` (replacing older lines of either).
    pub fn add(&self, id: u32, name: &str, path: &Path) -> io::Result<()> {
        let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let shown = path.display().to_string();
        let projects = format!("{id}:{shown}");
        rewrite(
            &self.dir.join("projects"),
            |l| !(names_id(l, 0, id) || field(l, 1) == Some(shown.as_str())),
            Some(&projects),
        )?;
        let projid = format!("{name}:{id}");
        rewrite(
            &self.projid(),
            |l| !(names_id(l, 1, id) || field(l, 0) == Some(name)),
            Some(&projid),
        )
    }

    /// Forgets project `id`.
    pub fn remove(&self, id: u32) -> io::Result<()> {
        let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        rewrite(&self.dir.join("projects"), |l| !names_id(l, 0, id), None)?;
        rewrite(&self.projid(), |l| !names_id(l, 1, id), None)
    }
}

fn field(line: &str, i: usize) -> Option<&str> {
    let line = line.trim();
    // A path may hold ':' of its own: the second field is the rest of the line.
    (!line.starts_with('#')).then(|| line.splitn(2, ':').nth(i))?
}

fn names_id(line: &str, i: usize, id: u32) -> bool {
    field(line, i).and_then(|f| f.trim().parse::<u32>().ok()) == Some(id)
}

/// Keeps the lines `keep` accepts, appends `add`, and replaces the file atomically (0644, as
/// the system's own).
fn rewrite(file: &Path, keep: impl Fn(&str) -> bool, add: Option<&str>) -> io::Result<()> {
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut text: String = old
        .lines()
        .filter(|l| keep(l))
        .flat_map(|l| [l, "\n"])
        .collect();
    if let Some(line) = add {
        text.push_str(line);
        text.push('\n');
    }
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = file.with_file_name(format!(".{name}.storage-agent"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_added_replaced_and_removed_leaving_others_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("projid"), "# ours\nlegacy:7\n").unwrap();
        let pf = ProjectFiles::new(dir.path().to_path_buf());
        pf.add(3, "aa11", Path::new("/vol/aa11")).unwrap();
        pf.add(4, "bb22", Path::new("/vol/bb22")).unwrap();
        // A scope made again under another id replaces its old line.
        pf.add(5, "aa11", Path::new("/vol/aa11")).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("projects"), "4:/vol/bb22\n5:/vol/aa11\n");
        assert_eq!(read("projid"), "# ours\nlegacy:7\nbb22:4\naa11:5\n");
        pf.remove(4).unwrap();
        pf.remove(3).unwrap();
        assert_eq!(read("projects"), "5:/vol/aa11\n");
        assert_eq!(read("projid"), "# ours\nlegacy:7\naa11:5\n");
    }
}
