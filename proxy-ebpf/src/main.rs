//! The kernel half of spliced: three programs, each a thin entry here over the module that
//! does its work.
//!
//! - `spliced_verdict` (sk_skb stream verdict, attached to `RECV`): [`verdict`] hands every
//!   byte a spliced socket receives to its peer socket's egress.
//! - `spliced_msg` (sk_msg, attached to `SOCKS` for `--egress-audit` only): counts every byte
//!   that enters a spliced socket's send path ([`counters::sent`]): what the daemon writes
//!   itself, and every batch the verdict redirected there, since the kernel's backlog worker
//!   sends redirected bytes through the socket's `sendmsg`. The egress total is checked
//!   against the bytes both ends sent.
//! - `spliced_hold` (sock_ops, attached to the daemon's cgroup): [`hold`] takes a socket out
//!   of `RECV` under its socket lock when the daemon asks, which is how a sender is held back.
//!
//! The maps are in [`maps`].
#![no_std]
#![no_main]

mod counters;
mod hold;
mod maps;
mod verdict;

use aya_ebpf::{
    bindings::sk_action,
    macros::{sk_msg, sock_ops, stream_verdict},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};

#[stream_verdict]
pub fn spliced_verdict(ctx: SkBuffContext) -> u32 {
    match verdict::try_verdict(&ctx) {
        Ok(action) => action,
        Err(dropped) => {
            dropped.log(&ctx);
            sk_action::SK_DROP
        }
    }
}

#[sk_msg]
pub fn spliced_msg(ctx: SkMsgContext) -> u32 {
    counters::sent(ctx.size());
    sk_action::SK_PASS
}

#[sock_ops]
pub fn spliced_hold(ctx: SockOpsContext) -> u32 {
    hold::on_sock_ops(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
