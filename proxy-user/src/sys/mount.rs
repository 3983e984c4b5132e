//! Mounting the cgroup v2 file system where a mount namespace has none.

use std::io;

/// `dir` as a C string for the mount calls.
fn c_path(dir: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Mounts the cgroup v2 file system on `dir`.
pub fn mount_cgroup2(dir: &std::path::Path) -> io::Result<()> {
    let target = c_path(dir)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount on `dir` (lazily: open files inside stay usable).
pub fn detach_mount(dir: &std::path::Path) -> io::Result<()> {
    let target = c_path(dir)?;
    // SAFETY: the pointer is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
