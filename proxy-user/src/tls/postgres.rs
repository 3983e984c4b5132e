//! The start of a PostgreSQL connection on a `pg_tls` port: the client asks for TLS with an
//! `SSLRequest` (answered `S`), or starts TLS at once (PostgreSQL 17's direct negotiation), or
//! asks for GSSAPI encryption (answered `N`, as a server without it does) and then for one of
//! the others, or starts in plain text, whose bytes are passed on to the machine unchanged.

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// How the client wants to go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// A TLS handshake follows.
    Tls,
    /// Plain text: these bytes, already read, go to the machine first.
    Plain(Vec<u8>),
}

/// Reads what the client sends first and answers it as PostgreSQL would.
pub async fn negotiate(client: &mut TcpStream) -> std::io::Result<Start> {
    loop {
        let mut first = [0u8; 1];
        if client.peek(&mut first).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first[0] == TLS_HANDSHAKE {
            return Ok(Start::Tls);
        }
        let mut head = [0u8; 8];
        client.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        match (len, code) {
            (8, SSL_REQUEST) => {
                client.write_all(b"S").await?;
                return Ok(Start::Tls);
            }
            (8, GSSENC_REQUEST) => client.write_all(b"N").await?,
            _ => return Ok(Start::Plain(head.to_vec())),
        }
    }
}
