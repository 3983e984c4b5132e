//! Map operations on a map's file descriptor (`bpf(2)`), one element or a batch per call. They
//! take no lock of the daemon's: the kernel orders concurrent updates of one map, so every
//! connection task may change its own entries at the same time as the others.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
};

const MAP_CREATE: libc::c_long = 0;
const MAP_LOOKUP_ELEM: libc::c_long = 1;
const MAP_UPDATE_ELEM: libc::c_long = 2;
const MAP_DELETE_ELEM: libc::c_long = 3;
const MAP_UPDATE_BATCH: libc::c_long = 26;
const MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` as the element commands read it.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` as the batch commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` as `BPF_MAP_CREATE` reads it (the fields a plain map needs).
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A `SOCKHASH` of `max_entries` sockets keyed by `u64`, outside the daemon's object (for
/// probes).
pub fn sockhash(max_entries: u32) -> io::Result<OwnedFd> {
    const SOCKHASH: u32 = 18;
    let mut attr = CreateAttr {
        map_type: SOCKHASH,
        key_size: 8,
        value_size: 4,
        max_entries,
        ..CreateAttr::default()
    };
    let rc = bpf_call(MAP_CREATE, &mut attr)?;
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("bpf() returned no descriptor"))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Copies of this process's descriptors of BPF links whose program is one of `prog_ids`, as
/// `/proc/self/fdinfo` describes each descriptor (`link_id` and `prog_id` lines).
pub fn own_bpf_links(prog_ids: &[u32]) -> io::Result<Vec<OwnedFd>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A descriptor closed since the listing has no fdinfo any more.
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        if field("link_id:").is_none() {
            continue;
        }
        if field("prog_id:").is_some_and(|id| prog_ids.contains(&id)) {
            // SAFETY: the descriptor is open in this process for the duration of the call
            // (the daemon's own link descriptors are not closed while it loads).
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            found.push(borrowed.try_clone_to_owned()?);
        }
    }
    Ok(found)
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// The command's return value (a new descriptor for the commands that make one).
fn bpf_call<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `union bpf_attr` prefix of the layout `cmd` reads, valid for its
    // size; every pointer in it refers to memory the caller keeps alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    bpf_call(cmd, attr).map(drop)
}

/// Sets `key` to `value` (`flags`: `BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`). For a socket map
/// the value is the socket's file descriptor as a `u32`.
pub fn map_update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        flags,
        ..ElemAttr::default()
    };
    bpf(MAP_UPDATE_ELEM, &mut attr)
}

/// The value of `key`; `ENOENT` when it has none.
pub fn map_lookup<K: aya::Pod, V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<V> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..ElemAttr::default()
    };
    bpf(MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

/// Removes `key`; `ENOENT` when it was not there.
pub fn map_delete<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        key: std::ptr::from_ref(key) as u64,
        ..ElemAttr::default()
    };
    bpf(MAP_DELETE_ELEM, &mut attr)
}

/// Sets every `keys[i]` to `values[i]` in one call (hash maps). On an error, the keys before
/// the one that failed were set.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        map_fd: fd_u32(map),
        ..BatchAttr::default()
    };
    bpf(MAP_UPDATE_BATCH, &mut attr)
}

/// Removes every key in `keys` that is present, in one call when all are.
pub fn map_delete_all<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        map_fd: fd_u32(map),
        ..BatchAttr::default()
    };
    match bpf(MAP_DELETE_BATCH, &mut attr) {
        // A batch stops at the first missing key: remove the rest one by one.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            for key in keys {
                match map_delete(map, key) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        other => other,
    }
}
