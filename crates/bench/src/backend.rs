//! The backend every proxy forwards to, on loopback: one listener, and the first byte of a
//! connection picks what it does.
//!
//! - `E…`: echo everything (the `E` included) until end of stream;
//! - `U` + length (u64 LE) + that many pattern bytes: verify every byte, answer the length;
//! - `D` + length (u64 LE): send that many pattern bytes, then end the stream.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::pattern;
use crate::procs;

/// Read buffer of the backend and the clients.
pub(crate) const CHUNK: usize = 128 * 1024;

/// A running backend; stops (and closes its connections) when dropped.
pub(crate) struct Backend {
    addr: SocketAddr,
    stop: Arc<Notify>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Backend {
    /// Starts a backend on 127.0.0.1 with `threads` workers, all on CPU 0 if `pinned`.
    pub(crate) fn start(threads: usize, pinned: bool) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_io()
            .on_thread_start(move || {
                if pinned {
                    procs::pin_current_thread(0);
                }
            })
            .build()?;
        let listener = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
            socket.listen(4096)
        })?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(Notify::new());
        runtime.spawn(accept(listener, Arc::clone(&stop)));
        Ok(Self {
            addr,
            stop,
            runtime: Some(runtime),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.notify_waiters();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept(listener: TcpListener, stop: Arc<Notify>) {
    loop {
        let accepted = tokio::select! {
            () = stop.notified() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = serve(stream).await;
                });
            }
            // Out of descriptors: let the client's timeout report it.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buffer = vec![0u8; CHUNK];
    let n = stream.read(&mut buffer).await?;
    if n == 0 {
        return Ok(());
    }
    match buffer[0] {
        b'E' => {
            let mut n = n;
            loop {
                stream.write_all(&buffer[..n]).await?;
                n = stream.read(&mut buffer).await?;
                if n == 0 {
                    return stream.shutdown().await;
                }
            }
        }
        mode @ (b'U' | b'D') => {
            let mut have = n;
            while have < 9 {
                let more = stream.read(&mut buffer[have..]).await?;
                if more == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                have += more;
            }
            let len = u64::from_le_bytes(buffer[1..9].try_into().expect("8 bytes"));
            if mode == b'U' {
                upload(&mut stream, &mut buffer, 9..have, len).await
            } else {
                download(&mut stream, len).await
            }
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {other:#x}"),
        )),
    }
}

/// Receives and verifies `len` pattern bytes (the first ones are `buffer[first]`), then answers
/// the count; a wrong byte closes the connection without an answer.
async fn upload(
    stream: &mut TcpStream,
    buffer: &mut [u8],
    first: std::ops::Range<usize>,
    len: u64,
) -> io::Result<()> {
    let mut offset = 0u64;
    let mut data = first;
    loop {
        if !pattern::check(offset, &buffer[data.clone()]) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt upload"));
        }
        offset += data.len() as u64;
        if offset >= len {
            break;
        }
        let want = (len - offset).min(buffer.len() as u64) as usize;
        let n = stream.read(&mut buffer[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        data = 0..n;
    }
    if offset != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "upload too long",
        ));
    }
    stream.write_all(&offset.to_le_bytes()).await?;
    stream.shutdown().await
}

/// Sends `len` pattern bytes, ends the stream, and waits for the client to close.
async fn download(stream: &mut TcpStream, len: u64) -> io::Result<()> {
    let mut offset = 0u64;
    while offset < len {
        let piece = pattern::slice(offset, (len - offset).min(CHUNK as u64) as usize);
        stream.write_all(piece).await?;
        offset += piece.len() as u64;
    }
    stream.shutdown().await?;
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).await? > 0 {}
    Ok(())
}
