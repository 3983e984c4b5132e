//! Empty library target: it lets `proxy-user` name this crate as a build dependency, so that
//! cargo rebuilds the daemon when the kernel programs change. The programs are in `main.rs`.
#![no_std]
