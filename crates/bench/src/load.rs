//! The clients: blocking sockets on plain threads, every loop bounded in count and time, every
//! byte verified.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::backend::CHUNK;
use crate::{pattern, procs};

/// Size of a request and of its echo.
const MESSAGE: usize = 64;

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// A 64-byte echo request: `E`, then `seq` and filler that change with it.
fn request(seq: u64) -> [u8; MESSAGE] {
    let mut message = [0u8; MESSAGE];
    message[0] = b'E';
    for (i, byte) in message.iter_mut().enumerate().skip(1) {
        *byte = (seq.wrapping_mul(31).wrapping_add(i as u64 * 7)) as u8;
    }
    message
}

/// One request and its echo; fails unless the echo is exactly the request.
fn round_trip(stream: &mut TcpStream, seq: u64) -> io::Result<()> {
    let message = request(seq);
    stream.write_all(&message)?;
    let mut echo = [0u8; MESSAGE];
    stream.read_exact(&mut echo)?;
    if echo != message {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// Whether a connection to `addr` carries an echo now.
pub(crate) fn probe(addr: SocketAddr) -> bool {
    connect(addr, Duration::from_secs(1))
        .and_then(|mut stream| round_trip(&mut stream, 0))
        .is_ok()
}

/// Which way bulk bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Client → backend.
    Upload,
    /// Backend → client.
    Download,
}

/// Moves `bytes` over each of `streams` connections at once; returns the wall time from the
/// first connect to the last verified byte.
pub(crate) fn bulk(
    addr: SocketAddr,
    direction: Direction,
    streams: usize,
    bytes: u64,
) -> anyhow::Result<Duration> {
    let barrier = Arc::new(Barrier::new(streams + 1));
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                one_stream(addr, direction, bytes)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a bulk worker panicked"))??;
    }
    Ok(start.elapsed())
}

fn one_stream(addr: SocketAddr, direction: Direction, bytes: u64) -> anyhow::Result<()> {
    let mut stream = connect(addr, Duration::from_secs(30)).context("bulk connect")?;
    let mut header = [0u8; 9];
    header[0] = if direction == Direction::Upload {
        b'U'
    } else {
        b'D'
    };
    header[1..].copy_from_slice(&bytes.to_le_bytes());
    stream.write_all(&header)?;
    let mut offset = 0u64;
    match direction {
        Direction::Upload => {
            while offset < bytes {
                let piece = pattern::slice(offset, (bytes - offset).min(CHUNK as u64) as usize);
                stream.write_all(piece).context("bulk write")?;
                offset += piece.len() as u64;
            }
            let mut answer = [0u8; 8];
            stream
                .read_exact(&mut answer)
                .context("reading the backend's count (it closes on a corrupt byte)")?;
            if u64::from_le_bytes(answer) != bytes {
                bail!(
                    "the backend verified {} of {bytes} bytes",
                    u64::from_le_bytes(answer)
                );
            }
        }
        Direction::Download => {
            let mut buffer = vec![0u8; CHUNK];
            loop {
                let n = stream.read(&mut buffer).context("bulk read")?;
                if n == 0 {
                    break;
                }
                if !pattern::check(offset, &buffer[..n]) {
                    bail!("corrupt byte in the download near offset {offset}");
                }
                offset += n as u64;
                if offset > bytes {
                    bail!("download longer than {bytes} bytes");
                }
            }
            if offset != bytes {
                bail!("download ended after {offset} of {bytes} bytes");
            }
        }
    }
    Ok(())
}

/// Round-trip latencies in nanoseconds of `count` 64-byte echoes on one kept-alive connection,
/// after `warmup` unrecorded ones; on CPU 0 if `pinned`.
pub(crate) fn ping_pong(
    addr: SocketAddr,
    warmup: usize,
    count: usize,
    pinned: bool,
) -> anyhow::Result<Vec<u64>> {
    std::thread::spawn(move || {
        if pinned {
            procs::pin_current_thread(0);
        }
        let mut stream = connect(addr, Duration::from_secs(5))?;
        let mut samples = Vec::with_capacity(count);
        for seq in 0..(warmup + count) as u64 {
            let start = Instant::now();
            round_trip(&mut stream, seq).context("round trip")?;
            if seq >= warmup as u64 {
                samples.push(start.elapsed().as_nanos() as u64);
            }
        }
        Ok(samples)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the ping-pong thread panicked"))?
}

/// `connections` kept-alive connections doing round trips for `duration`: the latencies of all.
pub(crate) fn concurrent(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<(Vec<u64>, Duration)> {
    let barrier = Arc::new(Barrier::new(connections + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (barrier, stop) = (Arc::clone(&barrier), Arc::clone(&stop));
            std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
                let stream = connect(addr, Duration::from_secs(5));
                barrier.wait();
                let mut stream = stream?;
                let mut samples = Vec::new();
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    round_trip(&mut stream, seq).context("round trip")?;
                    samples.push(start.elapsed().as_nanos() as u64);
                    seq += 1;
                }
                Ok(samples)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for worker in workers {
        all.extend(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??,
        );
    }
    Ok((all, start.elapsed()))
}

/// Result of the connection-rate test.
pub(crate) struct Rate {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
}

/// `workers` threads, each: connect, 64-byte echo, close, for `duration`.
pub(crate) fn connection_rate(
    addr: SocketAddr,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<Rate> {
    let barrier = Arc::new(Barrier::new(workers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (barrier, stop) = (Arc::clone(&barrier), Arc::clone(&stop));
            let (ok, errors) = (Arc::clone(&ok), Arc::clone(&errors));
            std::thread::spawn(move || {
                barrier.wait();
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let result = connect(addr, Duration::from_secs(2))
                        .and_then(|mut stream| round_trip(&mut stream, seq));
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                    seq += 1;
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))?;
    }
    Ok(Rate {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

/// Like [`connect`] from source address `127.0.0.<10 + seq % 200>`, so many connections do not
/// crowd one source address's ephemeral ports (other tests on the machine share them).
fn connect_from(addr: SocketAddr, seq: u64, timeout: Duration) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    procs::bind_address_no_port(&socket)?;
    let source = std::net::Ipv4Addr::new(127, 0, 0, 10 + (seq % 200) as u8);
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Opens `count` connections, each checked with one echo, and keeps them; stops at the first
/// failure or after `deadline`. Returns the ones that carried their echo.
pub(crate) fn open_idle(
    addr: SocketAddr,
    count: usize,
    deadline: Duration,
) -> (Vec<TcpStream>, Option<String>) {
    let start = Instant::now();
    let mut open = Vec::with_capacity(count);
    for seq in 0..count as u64 {
        if start.elapsed() > deadline {
            return (open, Some(format!("deadline of {deadline:?} passed")));
        }
        let result = connect_from(addr, seq, Duration::from_secs(5)).and_then(|mut stream| {
            round_trip(&mut stream, seq)?;
            Ok(stream)
        });
        match result {
            Ok(stream) => open.push(stream),
            Err(error) => return (open, Some(format!("connection {seq}: {error}"))),
        }
    }
    (open, None)
}

/// Closes connections with a reset (`SO_LINGER` 0): no `TIME_WAIT` left behind to crowd the
/// ephemeral ports of the next tool's test.
pub(crate) fn reset_all(streams: Vec<TcpStream>) {
    for stream in streams {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
}

/// Checks that every connection still echoes; returns how many did.
pub(crate) fn still_alive(streams: &mut [TcpStream]) -> usize {
    let mut alive = 0;
    for (seq, stream) in streams.iter_mut().enumerate() {
        if round_trip(stream, seq as u64 + 1).is_ok() {
            alive += 1;
        }
    }
    alive
}
