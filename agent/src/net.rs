//! The guest's network at start-up: loopback always up, and `eth0`
//! configured from the kernel command line when the sandbox has a network
//! interface (`ligera.ip=ADDR/PREFIX[,GATEWAY]`, written by ligera).

use std::io;
use std::net::Ipv4Addr;

/// What `ligera.ip=` asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Ipv4Config {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl Ipv4Config {
    /// The netmask of `prefix` (1..=32).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix))
                .unwrap_or(0),
        )
    }
}

/// The `ligera.ip=` value of a kernel command line, if any.
pub fn parse_cmdline(cmdline: &str) -> Result<Option<Ipv4Config>, String> {
    let Some(value) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ligera.ip="))
    else {
        return Ok(None);
    };
    let bad = || format!("ligera.ip={value}: not ADDR/PREFIX[,GATEWAY]");
    let (cidr, gateway) = match value.split_once(',') {
        Some((c, g)) => (c, Some(g.parse::<Ipv4Addr>().map_err(|_| bad())?)),
        None => (value, None),
    };
    let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let address = address.parse::<Ipv4Addr>().map_err(|_| bad())?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(bad)?;
    Ok(Some(Ipv4Config {
        address,
        prefix,
        gateway,
    }))
}

/// Brings `lo` up, and `eth0` up with `config`.
pub fn configure(config: Option<&Ipv4Config>) -> io::Result<()> {
    let sock = Socket::new()?;
    sock.up("lo")?;
    let Some(c) = config else {
        return Ok(());
    };
    sock.set_addr("eth0", libc::SIOCSIFADDR, c.address)?;
    sock.set_addr("eth0", libc::SIOCSIFNETMASK, c.netmask())?;
    sock.up("eth0")?;
    if let Some(gw) = c.gateway {
        sock.default_route(gw)?;
    }
    Ok(())
}

/// An AF_INET datagram socket for the interface ioctls.
struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl Socket {
    fn new() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain data; all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return Err(io::Error::other(format!("interface name {name} too long")));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl(
        &self,
        what: &str,
        name: &str,
        op: libc::c_ulong,
        arg: *mut libc::c_void,
    ) -> io::Result<()> {
        // SAFETY: `arg` points at the structure `op` takes, alive for the call.
        if unsafe { libc::ioctl(self.0, op as _, arg) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what} {name}: {e}")));
        }
        Ok(())
    }

    fn up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        self.ioctl("flags of", name, libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        self.ioctl("bring up", name, libc::SIOCSIFFLAGS, (&raw mut req).cast())
    }

    fn set_addr(&self, name: &str, op: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        self.ioctl("address of", name, op, (&raw mut req).cast())
    }

    fn default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain data; all zeroes is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        self.ioctl(
            "default route via",
            &gateway.to_string(),
            libc::SIOCADDRT,
            (&raw mut rt).cast(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        assert_eq!(parse_cmdline("console=ttyS0 quiet"), Ok(None));
        assert_eq!(
            parse_cmdline("quiet ligera.ip=10.0.2.2/24,10.0.2.1 init=/agent"),
            Ok(Some(Ipv4Config {
                address: Ipv4Addr::new(10, 0, 2, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 1)),
            }))
        );
        assert_eq!(
            parse_cmdline("ligera.ip=192.168.1.5/32")
                .unwrap()
                .unwrap()
                .gateway,
            None
        );
        let mask = |p: &str| {
            parse_cmdline(&format!("ligera.ip=10.0.0.2/{p}"))
                .unwrap()
                .unwrap()
                .netmask()
        };
        assert_eq!(mask("24"), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask("32"), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(mask("1"), Ipv4Addr::new(128, 0, 0, 0));
        for bad in ["1.2.3.4", "1.2.3.4/0", "1.2.3.4/33", "x/24", "1.2.3.4/24,y"] {
            assert!(parse_cmdline(&format!("ligera.ip={bad}")).is_err(), "{bad}");
        }
    }
}
