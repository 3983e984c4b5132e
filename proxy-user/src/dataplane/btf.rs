//! Reads where the running kernel keeps the `struct tcp_sock` fields the kernel programs need
//! ([`TcpSockLayout`]) from its BTF (`/sys/kernel/btf/vmlinux`). No program context carries a
//! TCP socket's write sequence, and the layout differs between kernel builds; the programs
//! read the fields at these offsets and the verifier checks every read against the same BTF.
#![forbid(unsafe_code)]

use std::path::Path;

use proxy_common::TcpSockLayout;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why the layout could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not BTF data, or truncated")]
    Malformed(String),
    #[error("{path}: no struct tcp_sock")]
    NoStruct { path: String },
    #[error("{path}: struct tcp_sock has no integer {field} of {size} bytes at a byte offset")]
    NoField {
        path: String,
        field: &'static str,
        size: u32,
    },
}

/// One type of the BTF: its kind, name, size-or-type word (`word`), and where its extra data
/// starts.
#[derive(Clone, Copy)]
struct Type {
    kind: u32,
    kind_flag: bool,
    vlen: u32,
    name_off: u32,
    word: u32,
    extra: usize,
}

struct Parsed<'a> {
    data: &'a [u8],
    strings: &'a [u8],
    /// Index `i` is type id `i + 1`.
    types: Vec<Type>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn parse(data: &[u8]) -> Option<Parsed<'_>> {
    if u16::from_le_bytes(data.get(0..2)?.try_into().ok()?) != MAGIC {
        return None;
    }
    let hdr_len = u32_at(data, 4)? as usize;
    let type_off = u32_at(data, 8)? as usize;
    let type_len = u32_at(data, 12)? as usize;
    let str_off = u32_at(data, 16)? as usize;
    let str_len = u32_at(data, 20)? as usize;
    let types_at = hdr_len.checked_add(type_off)?;
    let types_end = types_at.checked_add(type_len)?;
    let strings_at = hdr_len.checked_add(str_off)?;
    let strings = data.get(strings_at..strings_at.checked_add(str_len)?)?;
    let mut types = Vec::new();
    let mut at = types_at;
    while at < types_end {
        let name_off = u32_at(data, at)?;
        let info = u32_at(data, at + 4)?;
        let word = u32_at(data, at + 8)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        let extra = at + 12;
        let extra_len = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
            _ => 0,
        };
        types.push(Type {
            kind,
            kind_flag: info >> 31 == 1,
            vlen,
            name_off,
            word,
            extra,
        });
        at = extra + extra_len;
    }
    (at == types_end).then_some(Parsed {
        data,
        strings,
        types,
    })
}

impl Parsed<'_> {
    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    }

    fn by_id(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Type `id` with typedefs and qualifiers looked through.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            let t = self.by_id(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.word;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The type id and bit offset of member `field` of struct or union `s`, not a bitfield.
    fn member(&self, s: &Type, field: &str) -> Option<(u32, u32)> {
        (0..s.vlen as usize).find_map(|i| {
            let at = s.extra + 12 * i;
            let name_off = u32_at(self.data, at)?;
            let type_id = u32_at(self.data, at + 4)?;
            let offset = u32_at(self.data, at + 8)?;
            if self.name(name_off) != field.as_bytes() {
                return None;
            }
            let (bits, bitfield) = if s.kind_flag {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            (bitfield == 0).then_some((type_id, bits))
        })
    }

    /// Byte offset, from the start of struct `s`, of the integer of `size` bytes reached by
    /// the member names of `path`, each in the struct or union the previous one is.
    fn offset(&self, s: &Type, path: &[&str], size: u32) -> Option<u32> {
        let mut within = s;
        let mut bits = 0u32;
        for (i, field) in path.iter().enumerate() {
            if within.kind != KIND_STRUCT && within.kind != KIND_UNION {
                return None;
            }
            let (type_id, offset) = self.member(within, field)?;
            bits = bits.checked_add(offset)?;
            let t = self.resolve(type_id)?;
            if i + 1 == path.len() {
                return (t.kind == KIND_INT && t.word == size && bits.is_multiple_of(8))
                    .then_some(bits / 8);
            }
            within = t;
        }
        None
    }
}

/// The layout of `struct tcp_sock` in the BTF at `path`.
pub fn tcp_sock_layout(path: &Path) -> Result<TcpSockLayout, BtfError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: shown.clone(),
        source,
    })?;
    let btf = parse(&data).ok_or_else(|| BtfError::Malformed(shown.clone()))?;
    let tcp_sock = btf
        .types
        .iter()
        .find(|t| t.kind == KIND_STRUCT && btf.name(t.name_off) == b"tcp_sock")
        .ok_or_else(|| BtfError::NoStruct {
            path: shown.clone(),
        })?;
    let field = |field: &'static str, size: u32| {
        let path: Vec<&str> = field.split('.').collect();
        btf.offset(tcp_sock, &path, size)
            .ok_or_else(|| BtfError::NoField {
                path: shown.clone(),
                field,
                size,
            })
    };
    Ok(TcpSockLayout {
        write_seq: field("write_seq", 4)?,
        snd_una: field("snd_una", 4)?,
        bytes_acked: field("bytes_acked", 8)?,
        rmem_alloc: field("inet_conn.icsk_inet.sk.sk_backlog.rmem_alloc.counter", 4)?,
        copied_seq: field("copied_seq", 4)?,
        rcvbuf: field("inet_conn.icsk_inet.sk.sk_rcvbuf", 4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: 1 `int` (4 bytes), 2 an 8-byte int, 3 `typedef u64` of 2, 4 `struct
    /// inner { int counter; }` at bit 32, and 5 `struct tcp_sock` of `members` (name, type
    /// id, bit offset).
    fn blob(members: &[(&str, u32, u32)]) -> Vec<u8> {
        let mut strings = b"\0int\0u64\0inner\0counter\0tcp_sock\0".to_vec();
        let mut name = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let member_names: Vec<u32> = members.iter().map(|(n, _, _)| name(n)).collect();
        let mut types = Vec::new();
        let mut put = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        put(&[1, KIND_INT << 24, 4, 32]);
        put(&[0, KIND_INT << 24, 8, 64]);
        put(&[5, KIND_TYPEDEF << 24, 2]);
        put(&[9, KIND_STRUCT << 24 | 1, 8]);
        put(&[15, 1, 32]);
        put(&[23, KIND_STRUCT << 24 | members.len() as u32, 64]);
        for ((_, ty, off), name_off) in members.iter().zip(&member_names) {
            put(&[*name_off, *ty, *off]);
        }
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1, 0]);
        out.extend(24u32.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((types.len() as u32).to_le_bytes());
        out.extend((types.len() as u32).to_le_bytes());
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(types);
        out.extend(strings);
        out
    }

    fn offset(data: &[u8], path: &str, size: u32) -> Option<u32> {
        let btf = parse(data).expect("the blob parses");
        let tcp_sock = btf.by_id(5).expect("type 5");
        let path: Vec<&str> = path.split('.').collect();
        btf.offset(tcp_sock, &path, size)
    }

    #[test]
    fn finds_fields_by_name_size_and_nesting() {
        let data = blob(&[
            ("snd_una", 1, 32),
            ("bytes_acked", 3, 128),
            ("nest", 4, 256),
        ]);
        assert_eq!(offset(&data, "snd_una", 4), Some(4));
        assert_eq!(offset(&data, "bytes_acked", 8), Some(16));
        // 256 bits into tcp_sock, then 32 into inner.
        assert_eq!(offset(&data, "nest.counter", 4), Some(36));
    }

    #[test]
    fn refuses_wrong_sizes_names_and_paths() {
        let data = blob(&[
            ("snd_una", 1, 32),
            ("bytes_acked", 1, 128),
            ("nest", 4, 256),
        ]);
        assert_eq!(offset(&data, "bytes_acked", 8), None, "4 bytes here");
        assert_eq!(offset(&data, "write_seq", 4), None, "no such member");
        assert_eq!(offset(&data, "nest", 4), None, "a struct, not an integer");
        assert_eq!(
            offset(&data, "snd_una.counter", 4),
            None,
            "an integer has no members"
        );
        assert_eq!(
            offset(&data, "nest.other", 4),
            None,
            "no such nested member"
        );
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(parse(b"not btf at all, long enough for a header").is_none());
        let mut data = blob(&[("snd_una", 1, 32)]);
        data.truncate(data.len() - 4);
        assert!(parse(&data).is_none(), "truncated strings");
    }

    #[test]
    fn reads_this_kernel() {
        // Every kernel the daemon supports has BTF; this machine's must parse.
        let got = tcp_sock_layout(Path::new(VMLINUX)).expect("this kernel's tcp_sock");
        assert!(
            got.write_seq > 0
                && got.snd_una > 0
                && got.bytes_acked > 0
                && got.rmem_alloc > 0
                && got.copied_seq > 0
                && got.rcvbuf > 0,
            "{got:?}"
        );
    }
}
