//! Child processes spliced runs as machines: each leads a process group of its own, so that
//! a signal reaches everything it started, and is killed when spliced dies.

use std::io;

/// Makes the child of `cmd` lead a new process group and receive SIGKILL when the thread
/// that spawned it ends (spliced spawns from its main runtime's threads, which live as long
/// as the daemon). A child's own children are reached through the group on a clean stop.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only prctl and getppid,
    // which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nothing would send the signal.
            if libc::getppid() == 1 {
                return Err(io::Error::other(
                    "spliced exited while starting the machine",
                ));
            }
            Ok(())
        });
    }
}

/// Sends `signal` to every process of the group `pgid`. A group already gone is no error.
pub fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: kill takes plain integers; a negative pid names a process group.
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}
