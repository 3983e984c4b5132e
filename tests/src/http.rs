//! HTTP machines of the tests' own, over blocking sockets: one that answers each request with
//! the request's head (so a test sees the headers the proxy sent) or, for a request with a
//! body, the body itself; one that switches to an echo after a WebSocket-style upgrade; and
//! one that never answers.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
};

/// A request head as the machine read it: its lines, without the blank one.
pub struct Head {
    pub lines: Vec<String>,
}

impl Head {
    /// The value of header `name` (case-insensitive), if any; the first one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.lines.iter().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one request head; `None` at the end of the stream.
fn read_head(r: &mut impl BufRead) -> Option<Head> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return (!lines.is_empty()).then_some(Head { lines });
        }
        lines.push(line);
    }
}

/// Answers every request on `s` as machine `id` (in an `x-machine` header, with an
/// `x-drop: me` header for the proxy to remove): a request with a `Content-Length` body gets
/// the body back; any other the text of its own head. An upgrade request is answered 101 and
/// the connection echoes raw bytes from then on.
pub fn head_echo(id: &'static str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |s| {
        let Ok(mut w) = s.try_clone() else { return };
        let mut r = BufReader::new(s);
        while let Some(head) = read_head(&mut r) {
            if head.header("upgrade").is_some() {
                let _ = w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                );
                let mut buf = vec![0; 64 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = w.shutdown(std::net::Shutdown::Write);
                return;
            }
            let length: u64 = head
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let ok = if length > 0 {
                let header = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {length}\r\nx-machine: {id}\r\nx-drop: me\r\n\r\n"
                );
                w.write_all(header.as_bytes()).is_ok()
                    && std::io::copy(&mut (&mut r).take(length), &mut w).is_ok_and(|n| n == length)
            } else {
                let body = head.lines.join("\n") + "\n";
                let header = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-machine: {id}\r\nx-drop: me\r\ncontent-type: text/plain\r\n\r\n",
                    body.len()
                );
                w.write_all(header.as_bytes()).is_ok() && w.write_all(body.as_bytes()).is_ok()
            };
            if !ok {
                return;
            }
        }
    }
}

/// Reads requests and never answers them, until the client goes away.
pub fn silent(s: TcpStream) {
    let mut r = BufReader::new(s);
    while read_head(&mut r).is_some() {}
}
