//! The test workloads (the `test-support` feature): UDP and TCP exchanges, bulk TCP, HTTP
//! downloads and UDP GSO over loopback addresses, each bounded and ended before it returns.
use std::{
    io::{Read, Write},
    mem::size_of,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};

/// One UDP request/response between two sockets on `addr`. Returns (client port, server port).
pub fn udp_exchange(addr: IpAddr, payload: &[u8]) -> Result<(u16, u16)> {
    let server = UdpSocket::bind(SocketAddr::new(addr, 0))?;
    let client = UdpSocket::bind(SocketAddr::new(addr, 0))?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    client.send_to(payload, server.local_addr()?)?;
    let mut buf = [0u8; 2048];
    let (n, from) = server.recv_from(&mut buf)?;
    server.send_to(&buf[..n], from)?;
    let (m, _) = client.recv_from(&mut buf)?;
    if m != payload.len() {
        bail!("UDP echo returned {m} bytes, sent {}", payload.len());
    }
    Ok((client.local_addr()?.port(), server.local_addr()?.port()))
}

/// UDP ping-pong between two sockets on `addr`, one exchange every `every`, until `stop` is set
/// or `limit` has passed. Returns the exchanges completed. A datagram that does not arrive
/// within 200 ms (on a kernel without tcx, attaching classic tc to lo replaces its qdisc, which
/// can cost a datagram in flight) is given up on and the ping-pong goes on: it never stops by
/// itself before `limit`.
pub fn udp_ping_pong(
    addr: IpAddr,
    every: Duration,
    limit: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<u64> {
    let server = UdpSocket::bind(SocketAddr::new(addr, 0))?;
    let client = UdpSocket::bind(SocketAddr::new(addr, 0))?;
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    server.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (to, t0) = (server.local_addr()?, Instant::now());
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && t0.elapsed() < limit {
        client.send_to(&[7u8; 32], to)?;
        if let Ok((k, from)) = server.recv_from(&mut buf) {
            server.send_to(&buf[..k], from)?;
            if client.recv_from(&mut buf).is_ok() {
                n += 1;
            }
        }
        std::thread::sleep(every);
    }
    Ok(n)
}

/// A TCP connection on `addr`: connect, data both ways, close. Returns (client port, server port).
pub fn tcp_exchange(addr: IpAddr, payload: &[u8]) -> Result<(u16, u16)> {
    let listener = TcpListener::bind(SocketAddr::new(addr, 0))?;
    let server_addr = listener.local_addr()?;
    let data = payload.to_vec();
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = vec![0u8; data.len()];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?; // until the client closes
        Ok(())
    });
    let mut c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let client_port = c.local_addr()?.port();
    c.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    c.read_exact(&mut back)?;
    c.shutdown(std::net::Shutdown::Write)?;
    server.join().map_err(|_| anyhow!("TCP server thread panicked"))??;
    // The server closed after our FIN; wait until our side has seen its FIN and acknowledged
    // it (the socket leaves FIN_WAIT for CLOSE), so the whole exchange is on the wire when
    // this returns. On lo this has normally happened inside the server's close().
    let start = Instant::now();
    while tcp_state(&c)? != TCP_CLOSE {
        if start.elapsed() > Duration::from_secs(2) {
            bail!("TCP close handshake did not finish within 2 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((client_port, server_addr.port()))
}

/// Waits until `c` has finished its close handshake (see [`tcp_exchange`]).
fn wait_closed(c: &TcpStream) -> Result<()> {
    let start = Instant::now();
    while tcp_state(c)? != TCP_CLOSE {
        if start.elapsed() > Duration::from_secs(5) {
            bail!("TCP close handshake did not finish within 5 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Bulk TCP on `addr`: `writes` application writes of `size` bytes each (hundreds of KB per
/// `send`, so the stack builds maximum-size segments), read by the server until the close.
/// Returns the bytes the server received.
pub fn tcp_bulk(addr: IpAddr, writes: usize, size: usize) -> Result<u64> {
    let listener = TcpListener::bind(SocketAddr::new(addr, 0))?;
    let server_addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let mut c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(2))?;
    let chunk = vec![0x5au8; size];
    for _ in 0..writes {
        c.write_all(&chunk)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let got = server.join().map_err(|_| anyhow!("TCP server thread panicked"))??;
    wait_closed(&c)?;
    Ok(got)
}

/// `n` HTTP/1.0 downloads of `size` bytes from a local server on `addr`, one connection each
/// (the client sends a request, reads the response to the end, and its pure ACKs go back).
pub fn http_downloads(addr: IpAddr, n: usize, size: usize) -> Result<u64> {
    let listener = TcpListener::bind(SocketAddr::new(addr, 0))?;
    let server_addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> Result<()> {
        let body = vec![b'x'; size];
        for _ in 0..n {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut req = [0u8; 1024];
            let mut len = 0;
            while !req[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut req[len..])? {
                    0 => bail!("client closed before its request ended"),
                    k => len += k,
                }
                if len == req.len() {
                    bail!("request too long");
                }
            }
            write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n")?;
            s.write_all(&body)?;
        }
        Ok(())
    });
    let mut total = 0u64;
    for _ in 0..n {
        let mut c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(b"GET / HTTP/1.0\r\nHost: local\r\n\r\n")?;
        let mut resp = Vec::new();
        c.read_to_end(&mut resp)?;
        total += resp.len() as u64;
        c.shutdown(std::net::Shutdown::Write)?;
        wait_closed(&c)?;
    }
    server.join().map_err(|_| anyhow!("HTTP server thread panicked"))??;
    Ok(total)
}

/// One UDP send of `segs` segments of `seg` bytes with `UDP_SEGMENT` (UDP GSO), read back by a
/// receiver on `addr` as `segs` datagrams. Returns how many it read.
pub fn udp_gso(addr: IpAddr, seg: u16, segs: usize) -> Result<usize> {
    let rx = UdpSocket::bind(SocketAddr::new(addr, 0))?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;
    let tx = UdpSocket::bind(SocketAddr::new(addr, 0))?;
    const UDP_SEGMENT: libc::c_int = 103;
    let v: libc::c_int = seg.into();
    // SAFETY: setsockopt with a pointer to a live c_int and its size, on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    tx.send_to(&vec![0x33u8; seg as usize * segs], rx.local_addr()?)?;
    let mut buf = [0u8; 65536];
    for n in 0..segs {
        if rx.recv(&mut buf).is_err() {
            return Ok(n);
        }
    }
    Ok(segs)
}

/// `TCP_CLOSE` of the kernel's `include/net/tcp_states.h`.
const TCP_CLOSE: u8 = 7;

/// The kernel's TCP state of `s` (`TCP_INFO`'s `tcpi_state`).
fn tcp_state(s: &TcpStream) -> Result<u8> {
    // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes into it and `s` is an
    // open TCP socket for the duration of the call.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(info.tcpi_state)
}

#[cfg(test)]
mod tests {
    #[test]
    fn icmp_checksum_matches_rfc1071_example() {
        // RFC 1071 example words: 0001 f203 f4f5 f6f7 -> sum ddf2, checksum 220d
        assert_eq!(
            crate::traffic::checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }
}
