//! Linux `splice(2)` through a pipe: socket → pipe → socket without copying into user space.
//!
//! Pipes are pooled: a connection takes one only while bytes move in a direction and gives it
//! back (empty) as soon as its source has nothing to read, so idle connections hold no pipe and
//! a busy proxy reuses a small set instead of creating two per connection.
//!
//! This is the only module of the crate with `unsafe` code: three libc calls on descriptors we own
//! or borrow for the duration of the call.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// Bytes asked for in one splice; the pipe's capacity bounds what actually moves.
pub(crate) const CHUNK: usize = 1 << 20;

/// The pipe size we ask for: 1 MiB (the default `pipe-max-size`) moves a bulk transfer with
/// about a third less CPU than the 64 KiB default on loopback. Only capacity: pages are used only
/// while bytes are in flight. `F_SETPIPE_SZ` may refuse (per-user pipe limits), and then the
/// kernel default is used.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Empty pipes kept for reuse; more than this are closed when given back.
const POOL_MAX: usize = 256;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A non-blocking pipe: the buffer that bytes move through between two sockets.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int argument. A failure
        // (EPERM over the per-user pipe limit) leaves the default size, which still works.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { read, write })
    }

    /// Takes an empty pipe from the pool, or creates one.
    pub(crate) fn take() -> io::Result<Self> {
        if let Some(pipe) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(pipe);
        }
        Self::new()
    }

    /// Gives an empty pipe back to the pool. A pipe that may hold bytes must be dropped instead.
    pub(crate) fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }

    /// Moves up to `len` bytes from socket `from` into this (empty) pipe. `Ok(0)` is end of
    /// stream; `WouldBlock` means the socket has nothing to read.
    pub(crate) fn fill_from(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_fd(), len)
    }

    /// Moves up to `len` bytes from this pipe into socket `to`. `WouldBlock` means the socket's
    /// send buffer is full.
    pub(crate) fn drain_to(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_fd(), to, len)
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed); null offsets
    // are required for pipes and sockets; splice touches no memory of ours.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether a splice error means "splice cannot be used here" (fall back to a buffered copy)
/// rather than a failure of the connection.
pub(crate) fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn moves_bytes_between_sockets_and_pools_pipes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sender = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (from, _) = listener.accept().expect("accept");
        let to = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut receiver, _) = listener.accept().expect("accept");
        sender.write_all(b"hello splice").expect("write");
        let pipe = Pipe::take().expect("pipe");
        let n = pipe.fill_from(from.as_fd(), CHUNK).expect("fill");
        assert_eq!(n, 12);
        assert_eq!(pipe.drain_to(to.as_fd(), n).expect("drain"), 12);
        let mut buf = [0u8; 12];
        receiver.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello splice");
        pipe.give_back();
        assert!(!POOL.lock().expect("pool").is_empty());
    }
}
