#!/usr/bin/env bash
# Runs every check and test: formatting, lints, unit tests, the end-to-end
# tests with the test guests, and the Linux guest tests (which need the guest
# kernel and initramfs; resources/setup.sh installs and builds them).
set -euo pipefail
cd "$(dirname "$0")/.."

resources/setup.sh --no-demo
LIGERA_KERNEL_DIR=$(resources/build-guest-kernel.sh --print-path)
LIGERA_INITRD=$(resources/build-initramfs.sh --print-path)
export LIGERA_KERNEL_DIR LIGERA_INITRD

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The sandbox tests run the guest agent next to the debug ligera.
cargo build -p agent --bin ligera-agent
# --include-ignored: the Linux boots are ignored by a plain `cargo test`
# (they need the guest images and take seconds each here).
cargo test --workspace -- --include-ignored
