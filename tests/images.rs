//! OCI image layouts unpacked by `vmm::image::oci`: layers in order with
//! whiteouts, an opaque directory, hard links, symlinks, modes and owners;
//! and hostile images (`../`, absolute paths, a symlink leading out, a
//! digest mismatch, a truncated layer) refused with nothing written outside
//! the root. No VM: these run in milliseconds.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::oci::{Entry, Layer, write_layout};
use vmm::image::oci;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("images-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn layers_apply_in_order_with_whiteouts_links_and_owners() {
    let dir = scratch("layers");
    let layout = dir.join("layout");
    let base = Layer::plain(&[
        Entry::Dir("etc", 0o755),
        Entry::Owned("etc/secret", b"s3cret".to_vec(), 0o640, 1000, 100),
        Entry::File("etc/gone", b"removed by the next layer".to_vec(), 0o644),
        Entry::Dir("opq", 0o755),
        Entry::File("opq/old", b"hidden by the opaque marker".to_vec(), 0o644),
        Entry::Symlink("etc/link", "secret"),
        Entry::HardLink("etc/hard", "etc/secret"),
        Entry::Dir("work", 0o700),
    ]);
    let top = Layer::gzip(&[
        Entry::File("etc/.wh.gone", Vec::new(), 0o644),
        Entry::File("opq/.wh..wh..opq", Vec::new(), 0o644),
        Entry::File("opq/new", b"from the top layer".to_vec(), 0o600),
        Entry::File("work/run.sh", b"#!/bin/sh\necho hi\n".to_vec(), 0o755),
    ]);
    let config = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hi"],
        "Env": ["A=1", "PATH=/bin"],
        "WorkingDir": "/work",
        "User": "1000:100",
    });
    write_layout(&layout, &[base, top], config, "v1");
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let rc = oci::unpack(&layout, Some("v1"), &root).unwrap();
    assert_eq!(rc.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(rc.cmd, ["echo hi"]);
    assert_eq!(rc.env, ["A=1", "PATH=/bin"]);
    assert_eq!(rc.workdir.as_deref(), Some("/work"));
    assert_eq!(rc.user.as_deref(), Some("1000:100"));

    assert_eq!(std::fs::read(root.join("etc/secret")).unwrap(), b"s3cret");
    let m = std::fs::metadata(root.join("etc/secret")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1000, 100));
    assert_eq!(m.nlink(), 2, "etc/hard is a hard link to it");
    assert_eq!(
        std::fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("secret")
    );
    assert!(!root.join("etc/gone").exists(), "whiteout");
    assert!(!root.join("opq/old").exists(), "opaque directory");
    assert_eq!(
        std::fs::read(root.join("opq/new")).unwrap(),
        b"from the top layer"
    );
    assert_eq!(
        std::fs::metadata(root.join("work/run.sh")).unwrap().mode() & 0o777,
        0o755
    );
    assert!(!root.join("etc/.wh.gone").exists() && !root.join("opq/.wh..wh..opq").exists());
    // Without a tag: the only manifest; a wrong tag is an error.
    assert!(oci::unpack(&layout, Some("v2"), &dir).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_images_are_refused_and_write_nothing_outside() {
    let dir = scratch("hostile");
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let escape_target: &'static str = Box::leak(outside.display().to_string().into_boxed_str());
    let cases: Vec<(&str, Vec<Layer>, &str)> = vec![
        (
            "dot-dot",
            vec![Layer::plain(&[Entry::RawName(
                "../outside/pwned",
                b"x".to_vec(),
            )])],
            "'..'",
        ),
        (
            "absolute",
            vec![Layer::plain(&[Entry::RawName(
                Box::leak(format!("{escape_target}/pwned").into_boxed_str()),
                b"x".to_vec(),
            )])],
            "absolute",
        ),
        (
            "symlink-escape",
            vec![
                Layer::plain(&[Entry::Symlink("evil", escape_target)]),
                Layer::plain(&[Entry::File("evil/pwned", b"x".to_vec(), 0o644)]),
            ],
            "outside",
        ),
        (
            "hardlink-escape",
            vec![Layer::plain(&[Entry::HardLink(
                "stolen",
                "../outside/secret",
            )])],
            "'..'",
        ),
    ];
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    for (name, layers, why) in cases {
        let layout = dir.join(name);
        write_layout(&layout, &layers, serde_json::json!({}), "t");
        let root = dir.join(format!("{name}-root"));
        std::fs::create_dir(&root).unwrap();
        let err = oci::unpack(&layout, None, &root)
            .expect_err(name)
            .to_string();
        eprintln!("{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
        assert!(
            !outside.join("pwned").exists(),
            "{name}: wrote outside the root"
        );
    }

    // A layer whose bytes do not match its digest, and one cut short.
    let layout = dir.join("tampered");
    write_layout(
        &layout,
        &[Layer::gzip(&[Entry::File("a", vec![7; 100_000], 0o644)])],
        serde_json::json!({}),
        "t",
    );
    let blobs = layout.join("blobs/sha256");
    let mut biggest: Vec<_> = std::fs::read_dir(&blobs).unwrap().flatten().collect();
    biggest.sort_by_key(|e| e.metadata().unwrap().len());
    let layer = biggest.last().unwrap().path();
    let good = std::fs::read(&layer).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    std::fs::write(&layer, &flipped).unwrap();
    let root = dir.join("tampered-root");
    std::fs::create_dir(&root).unwrap();
    assert!(
        oci::unpack(&layout, None, &root).is_err(),
        "digest mismatch"
    );
    std::fs::write(&layer, &good[..good.len() / 2]).unwrap();
    let root = dir.join("truncated-root");
    std::fs::create_dir(&root).unwrap();
    assert!(
        oci::unpack(&layout, None, &root).is_err(),
        "truncated layer"
    );
    // Not an image at all.
    std::fs::write(layout.join("index.json"), b"{not json").unwrap();
    assert!(oci::unpack(&layout, None, &root).is_err());
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"host secret"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_ls_rm_and_prune_manage_the_cache() {
    let cache = scratch("cache");
    for f in [
        "oci-0123456789abcdef.ext4",
        "oci-0123456789abcdef.json",
        "rootfs-fedcba9876543210.ext4",
        "agent-1111111111111111.ext4",
    ] {
        std::fs::write(cache.join(f), vec![1u8; 8192]).unwrap();
    }
    let ligera = |args: &[&str]| {
        let out = std::process::Command::new(common::LIGERA)
            .args(args)
            .env("LIGERA_CACHE", &cache)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = ligera(&["image", "ls"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("oci-0123456789abcdef") && out.contains("rootfs-fedcba9876543210"),
        "{out}"
    );
    assert!(
        !out.contains("agent-"),
        "the agent's disk is not an image: {out}"
    );
    let (code, out) = ligera(&["image", "rm", "0123456789abcdef"]);
    assert_eq!((code, out.trim()), (0, "oci-0123456789abcdef"));
    assert!(!cache.join("oci-0123456789abcdef.json").exists());
    assert_eq!(ligera(&["image", "rm", "nothing-like-it"]).0, 1);
    let (code, out) = ligera(&["image", "prune"]);
    assert_eq!((code, out.trim()), (0, "rootfs-fedcba9876543210"));
    assert!(cache.join("agent-1111111111111111.ext4").exists());
    let _ = std::fs::remove_dir_all(&cache);
}
