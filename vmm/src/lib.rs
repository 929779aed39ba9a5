//! ligera's VMM: the only crate that owns KVM file descriptors and threads.
//!
//! `cli` turns the command line into a [`config::VmConfig`], `builder`
//! assembles a [`vm::Vm`] from it, and `vm` runs it until the guest reboots,
//! fails or a signal stops it; `exit` maps the outcome to an exit status.

pub mod api;
pub mod bench;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod exit;
pub mod firecracker;
pub mod host;
pub mod image;
pub mod jail;
pub mod loader;
pub mod logger;
pub mod options;
pub mod sandbox;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vm;
