//! The host side of a sandbox session (`vmm::sandbox::client::run_command`)
//! against arbitrary bytes from the guest agent: a taken-over guest can
//! send anything. The host must end with an error or an exit status, never
//! panic, hang or allocate beyond its limits.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use agent::protocol::ExecRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let bytes = data.to_vec();
    let player = std::thread::spawn(move || {
        let _ = agent.write_all(&bytes);
        let _ = agent.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = agent.read_to_end(&mut sink);
    });
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let _ = vmm::sandbox::client::run_command(host, &req, None, std::io::sink(), std::io::sink());
    let _ = player.join();
});
