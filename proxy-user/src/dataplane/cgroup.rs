//! Finding and opening the cgroup (v2) the hold program attaches to.

use super::kernel::LoadError;

/// The path of this process's cgroup in the cgroup v2 hierarchy (from `/proc/self/cgroup`).
/// Sockets belong to the cgroup of the process that created them (accepted ones to their
/// listener's), so the hold program attached there sees every connection of the daemon, and
/// no other cgroup's.
pub fn own_cgroup_path() -> Result<String, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    Ok(cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("/proc/self/cgroup has no cgroup v2 entry")?
        .to_owned())
}

/// The directory of the cgroup at `path` in the cgroup v2 hierarchy, where program `prog` is to
/// attach, opened (found through `/proc/self/mountinfo`).
///
/// Where no cgroup2 file system is mounted in this mount namespace (`ip netns exec` mounts a
/// fresh `/sys`), one is mounted on a private temporary directory just long enough to open
/// the directory, then detached.
///
/// The first directory opened is kept (or the one an upgrade's old process handed over,
/// [`adopt`]) and copies of it are returned for the same path: a daemon that has since
/// become an unprivileged user, and the new process it starts at an upgrade, could not
/// mount the file system again.
pub fn open_cgroup(prog: &'static str, path: &str) -> Result<std::fs::File, LoadError> {
    let error = |reason| LoadError::Cgroup {
        prog,
        path: path.to_owned(),
        reason,
    };
    if let Some((_, dir)) = OPENED.get().filter(|(kept, _)| kept == path) {
        return dir.try_clone().map_err(|e| error(format!("{path}: {e}")));
    }
    let dir = open_cgroup_dir(path).map_err(error)?;
    if let Ok(copy) = dir.try_clone() {
        let _ = OPENED.set((path.to_owned(), copy));
    }
    Ok(dir)
}

/// The cgroup directory opened first, and its path.
static OPENED: std::sync::OnceLock<(String, std::fs::File)> = std::sync::OnceLock::new();

/// A copy of the cgroup directory this process opened, and its path, to hand to the new
/// process of an upgrade.
pub fn opened() -> Option<(String, std::os::fd::OwnedFd)> {
    let (path, dir) = OPENED.get()?;
    Some((path.clone(), dir.try_clone().ok()?.into()))
}

/// Takes the cgroup directory at `path` an upgrade's old process opened as this process's
/// own (before anything here opens one).
pub fn adopt(path: String, dir: std::os::fd::OwnedFd) {
    let _ = OPENED.set((path, dir.into()));
}

fn open_cgroup_dir(path: &str) -> Result<std::fs::File, String> {
    let path = path.trim_start_matches('/');
    if path.split('/').any(|part| part == "..") {
        return Err(format!("{path}: a cgroup path may not contain '..'"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    // mountinfo: id parent major:minor root mount-point options... - fstype source options
    let mounted = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (right.split_whitespace().next() == Some("cgroup2") && root == "/").then_some(point)
    });
    if let Some(point) = mounted {
        let dir = std::path::Path::new(point).join(path);
        return std::fs::File::open(&dir).map_err(|e| format!("{}: {e}", dir.display()));
    }
    let tmp = std::env::temp_dir().join(format!("spliced-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let opened = crate::sys::mount_cgroup2(&tmp).and_then(|()| {
        let opened = std::fs::File::open(tmp.join(path));
        crate::sys::detach_mount(&tmp)?;
        opened
    });
    let _ = std::fs::remove_dir(&tmp);
    opened.map_err(|e| format!("through cgroup2 mounted on {}: {e}", tmp.display()))
}
