//! Becoming an unprivileged user that keeps a few capabilities, in every thread.
//!
//! Credentials belong to threads, not to the process: a thread that changes its user or its
//! capabilities changes only itself. The C library repeats a user change in every thread,
//! but not a change of capabilities, and a user change without them clears every
//! capability. So each thread runs the whole change itself: this one directly, every other
//! one in a signal handler, with system calls only (they are safe there), until
//! `/proc/self/task` shows every thread as the user with exactly the capabilities kept.

use std::{
    ffi::CString,
    io,
    sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Who the daemon becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Most supplementary groups a user may have here.
const MAX_GROUPS: usize = 64;

/// `name`'s user and groups, from the system's user database.
pub fn lookup_user(name: &str) -> io::Result<Identity> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the name"))?;
    // SAFETY: a plain C struct, all zeroes is a valid value; getpwnam_r fills it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and `buf`'s length is passed with it.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &raw mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such user"));
    }
    let (uid, gid) = (pw.pw_uid, pw.pw_gid);
    let mut groups = vec![0 as libc::gid_t; MAX_GROUPS];
    let mut n = MAX_GROUPS as libc::c_int;
    // SAFETY: `groups` holds `n` entries, and the call writes at most that many.
    let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &raw mut n) };
    if rc < 0 {
        return Err(io::Error::other(format!(
            "in more than {MAX_GROUPS} groups"
        )));
    }
    groups.truncate(usize::try_from(n).unwrap_or(0));
    Ok(Identity { uid, gid, groups })
}

/// What every thread becomes, for the signal handler (atomics: nothing there may lock).
static UID: AtomicU32 = AtomicU32::new(0);
static GID: AtomicU32 = AtomicU32::new(0);
static GROUPS: [AtomicU32; MAX_GROUPS] = [const { AtomicU32::new(0) }; MAX_GROUPS];
static NGROUPS: AtomicUsize = AtomicUsize::new(0);
static KEEP: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(40);
/// Threads that ran the handler since the last round, and the first error one met.
static SWITCHED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicI32 = AtomicI32::new(0);

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Switches every thread of the process to `who`, keeping only the capabilities in `keep`
/// (a mask of capability numbers) in its permitted, effective and bounding sets; the
/// inheritable and ambient sets are emptied, so a process it starts gets none. Needs root
/// (`CAP_SETUID`, `CAP_SETGID`, `CAP_SETPCAP`). An error before any thread changed leaves
/// the process as it was; one after (a thread that would not change) leaves it mixed, and
/// the caller must not go on.
pub fn become_user(who: &Identity, keep: u64) -> io::Result<()> {
    if who.groups.len() > MAX_GROUPS {
        return Err(io::Error::other(format!(
            "in more than {MAX_GROUPS} groups"
        )));
    }
    UID.store(who.uid, Ordering::SeqCst);
    GID.store(who.gid, Ordering::SeqCst);
    for (slot, g) in GROUPS.iter().zip(&who.groups) {
        slot.store(*g, Ordering::SeqCst);
    }
    NGROUPS.store(who.groups.len(), Ordering::SeqCst);
    KEEP.store(keep, Ordering::SeqCst);
    if let Some(last) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        LAST_CAP.store(last, Ordering::SeqCst);
    }
    // This thread first: a refusal here (not root) changes nothing anywhere.
    let rc = switch_this_thread();
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let signal = libc::SIGRTMIN() + 2;
    // SAFETY: a handler that makes only system calls and atomic operations, and keeps errno.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        if libc::sigaction(signal, &raw const action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let result = switch_other_threads(who.uid, keep, signal);
    // SAFETY: restores the default disposition of a signal nothing else uses.
    unsafe {
        libc::signal(signal, libc::SIG_IGN);
    }
    result
}

/// Makes the program `cmd` starts keep the capabilities this process has: its child puts its
/// permitted set into its inheritable and ambient sets before exec, since a program started
/// by a process that is not root begins with its ambient capabilities only. Only the
/// child's sets change; as root nothing is needed (exec gives root every capability its
/// bounding set allows).
pub fn pass_capabilities(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec, in the one thread of the child, and
    // makes only system calls (getuid, capget, capset, prctl) on locals.
    unsafe {
        cmd.pre_exec(|| {
            if libc::getuid() == 0 {
                return Ok(());
            }
            let mut data = capabilities()?;
            let permitted = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
            data[0].inheritable = data[0].permitted;
            data[1].inheritable = data[1].permitted;
            set_capabilities(&data)?;
            let raise = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_RAISE).unwrap_or(2);
            for cap in (0..64).filter(|c| permitted & (1 << c) != 0) {
                if libc::prctl(libc::PR_CAP_AMBIENT, raise, cap, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Makes the program `cmd` starts begin with none of this process's capabilities when it
/// is not root: its child empties its ambient and inheritable sets before exec (a daemon
/// started with ambient capabilities, as a service manager gives them, would otherwise
/// pass them on).
pub fn pass_no_capabilities(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec, in the one thread of the child, and
    // makes only system calls (prctl, capget, capset) on locals.
    unsafe {
        cmd.pre_exec(|| {
            clear_ambient()?;
            let mut data = capabilities()?;
            data[0].inheritable = 0;
            data[1].inheritable = 0;
            set_capabilities(&data)
        });
    }
}

/// The capability header that names the calling thread.
fn this_thread() -> CapHeader {
    CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    }
}

/// Empties this thread's ambient set (async-signal-safe: one system call).
fn clear_ambient() -> io::Result<()> {
    let clear = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_CLEAR_ALL).unwrap_or(4);
    // SAFETY: prctl with plain integers.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, clear, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// This thread's capability sets (async-signal-safe: one system call).
fn capabilities() -> io::Result<[CapData; 2]> {
    let header = this_thread();
    let empty = CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let mut data = [empty; 2];
    // SAFETY: capget writes two `CapData` for version 3 into `data`.
    if unsafe { libc::syscall(libc::SYS_capget, &raw const header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

/// Sets this thread's capability sets (async-signal-safe: one system call).
fn set_capabilities(data: &[CapData; 2]) -> io::Result<()> {
    let header = this_thread();
    // SAFETY: capset reads the header and two `CapData`, which outlive the call.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals every thread not yet switched, until none is left; threads started meanwhile by
/// one not yet switched are found on the next round.
fn switch_other_threads(uid: u32, keep: u64, signal: libc::c_int) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    loop {
        let pending = threads_not_switched(uid, keep)?;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "threads {pending:?} did not switch within 10 s"
            )));
        }
        SWITCHED.store(0, Ordering::SeqCst);
        let mut sent = 0;
        for tid in pending {
            // SAFETY: tgkill only sends a signal; a thread gone since is ESRCH.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) } == 0 {
                sent += 1;
            }
        }
        let round = Instant::now() + Duration::from_secs(1);
        while SWITCHED.load(Ordering::SeqCst) < sent && Instant::now() < round {
            std::thread::sleep(Duration::from_millis(1));
        }
        let failed = FAILED.load(Ordering::SeqCst);
        if failed != 0 {
            return Err(io::Error::from_raw_os_error(failed));
        }
    }
}

/// Threads of this process whose real user or effective capabilities are not yet `uid` and
/// `keep`.
fn threads_not_switched(uid: u32, keep: u64) -> io::Result<Vec<libc::pid_t>> {
    let mut pending = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing has no status left.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        let uids = field("Uid:");
        let effective = u64::from_str_radix(&field("CapEff:"), 16).ok();
        if !uids.split_whitespace().all(|u| u == uid.to_string()) || effective != Some(keep) {
            pending.push(tid);
        }
    }
    Ok(pending)
}

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: errno of this thread, restored for the code the signal interrupted.
    let saved = unsafe { *libc::__errno_location() };
    let rc = switch_this_thread();
    if rc != 0 {
        let _ = FAILED.compare_exchange(0, rc, Ordering::SeqCst, Ordering::SeqCst);
    }
    SWITCHED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// The whole change for the calling thread, in system calls only; 0 or the errno of the
/// first that failed. The bounding set shrinks first, while `CAP_SETPCAP` is there; the
/// capabilities survive the change of user (`PR_SET_KEEPCAPS`) and are then cut to `KEEP`.
fn switch_this_thread() -> i32 {
    let keep = KEEP.load(Ordering::SeqCst);
    let errno = || {
        // SAFETY: errno of this thread.
        unsafe { *libc::__errno_location() }
    };
    let mut groups = [0 as libc::gid_t; MAX_GROUPS];
    let n = NGROUPS.load(Ordering::SeqCst).min(MAX_GROUPS);
    for (g, slot) in groups.iter_mut().zip(&GROUPS).take(n) {
        *g = slot.load(Ordering::SeqCst);
    }
    let (uid, gid) = (UID.load(Ordering::SeqCst), GID.load(Ordering::SeqCst));
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: system calls on this thread's credentials, with pointers to locals that
    // outlive them.
    unsafe {
        for cap in 0..=LAST_CAP.load(Ordering::SeqCst).min(63) {
            if keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0
            {
                return errno();
            }
        }
        // Each step leaves errno set when it fails.
        if clear_ambient().is_err()
            || libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setgroups, n, groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            || set_capabilities(&data).is_err()
            || libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0
        {
            return errno();
        }
    }
    0
}
