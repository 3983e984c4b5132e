//! spliced: an edge TCP proxy in the style of Fly.io's. Userspace accepts and connects; a BPF
//! sockmap moves the bytes. See the README for the design and `dataplane::sockmap` for what
//! the kernel does not do by itself.

pub mod balance;
pub mod check;
pub mod config;
pub mod dataplane;
pub mod faults;
pub mod health;
pub mod http;
pub mod machines;
pub mod proxy_proto;
pub mod registry;
pub mod server;
pub mod status;
pub mod sys;
pub mod tls;
pub mod watch;
