//! OCI image layouts unpacked by `vmm::image::oci`: layers in order with
//! whiteouts, an opaque directory, hard links, symlinks, modes and owners;
//! and hostile images (`../`, absolute paths, a symlink leading out, a
//! digest mismatch, a truncated layer) refused with nothing written outside
//! the root. No VM: these run in milliseconds.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::oci::{Entry, Layer, tar, tar_dir, write_docker_archive, write_layout};
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

/// `ligera image pull REF` with its own cache: (status, stdout, stderr).
fn pull(cache: &Path, reference: &str, env: &[(&str, &Path)]) -> (i32, String, String) {
    let out = std::process::Command::new(common::LIGERA)
        .args(["image", "pull", reference])
        .env("LIGERA_CACHE", cache)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("pull {reference}: {} {}\n{}", r.0, r.1, r.2);
    r
}

/// A file's bytes in an ext4 disk, read with e2fsprogs' debugfs (`None`
/// when it is not there).
fn disk_file(disk: &Path, path: &str) -> Option<Vec<u8>> {
    let stat = std::process::Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(disk)
        .output()
        .unwrap();
    if String::from_utf8_lossy(&stat.stderr).contains("not found") {
        return None;
    }
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs on {}", disk.display());
    Some(out.stdout)
}

fn two_layers() -> (Vec<u8>, Vec<u8>) {
    let base = tar(&[
        Entry::Dir("etc", 0o755),
        Entry::File("etc/motd", b"hello from an archive\n".to_vec(), 0o644),
        Entry::File("etc/gone", b"whited out".to_vec(), 0o644),
    ]);
    let top = tar(&[
        Entry::File("etc/.wh.gone", Vec::new(), 0o644),
        Entry::File("etc/top", b"top layer".to_vec(), 0o600),
    ]);
    (base, top)
}

#[test]
fn docker_save_oci_archive_and_rootfs_tarball_images() {
    let dir = scratch("archives");
    let cache = dir.join("cache");
    let (base, top) = two_layers();
    let docker = dir.join("docker.tar");
    let config = serde_json::json!({"Cmd": ["/bin/true"], "Env": ["FROM=docker-save"]});
    write_docker_archive(
        &docker,
        &[base.clone(), top.clone()],
        config,
        "v1",
        |_, _| {},
    );
    let (code, id, err) = pull(&cache, docker.to_str().unwrap(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(id.starts_with("oci-"), "{id}");
    let disk = cache.join(format!("{id}.ext4"));
    assert_eq!(
        disk_file(&disk, "/etc/motd").unwrap(),
        b"hello from an archive\n"
    );
    assert_eq!(disk_file(&disk, "/etc/top").unwrap(), b"top layer");
    assert_eq!(disk_file(&disk, "/etc/gone"), None, "whiteout");
    let rc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join(format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(rc["cmd"], serde_json::json!(["/bin/true"]));
    assert_eq!(rc["env"], serde_json::json!(["FROM=docker-save"]));
    // Again: the archive is remembered, nothing is extracted.
    let (code, again, err) = pull(&cache, docker.to_str().unwrap(), &[]);
    assert_eq!((code, again.as_str()), (0, id.as_str()));
    assert!(!err.contains("extracting"), "{err}");
    // By tag (NAME:TAG or TAG); an unknown tag is an error.
    assert_eq!(pull(&cache, &format!("{}:v1", docker.display()), &[]).1, id);
    let (code, _, err) = pull(&cache, &format!("{}:v9", docker.display()), &[]);
    assert!(code != 0 && err.contains("no image tagged v9"), "{err}");

    // An OCI archive (a layout in a tar) is the same image as its layout.
    let layout = dir.join("layout");
    write_layout(
        &layout,
        &[Layer::plain(&[Entry::File(
            "hello",
            b"oci".to_vec(),
            0o644,
        )])],
        serde_json::json!({}),
        "t",
    );
    let (code, from_layout, _) = pull(&cache, layout.to_str().unwrap(), &[]);
    assert_eq!(code, 0);
    let oci_tar = dir.join("oci.tar");
    tar_dir(&layout, &oci_tar);
    assert_eq!(pull(&cache, oci_tar.to_str().unwrap(), &[]).1, from_layout);

    // A gzip root file system tarball.
    let rootfs_tgz = dir.join("rootfs.tgz");
    std::fs::write(
        &rootfs_tgz,
        common::oci::gzip(&tar(&[
            Entry::Dir("bin", 0o755),
            Entry::File("bin/tool", b"#!/bin/sh\n".to_vec(), 0o755),
        ])),
    )
    .unwrap();
    let (code, id, _) = pull(&cache, rootfs_tgz.to_str().unwrap(), &[]);
    assert!(code == 0 && id.starts_with("rootfs-"), "{id}");
    assert_eq!(
        disk_file(&cache.join(format!("{id}.ext4")), "/bin/tool").unwrap(),
        b"#!/bin/sh\n"
    );

    // Not an image: a clear error, status 1.
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let (code, _, err) = pull(&cache, junk.to_str().unwrap(), &[]);
    assert!(
        code == 1 && err.contains("neither a directory nor a tar"),
        "{err}"
    );
    let (code, _, err) = pull(&cache, "./no/such/dir", &[]);
    assert!(
        code == 1 && err.contains("not a registry reference"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_docker_archives_are_refused() {
    let dir = scratch("hostile-archives");
    let cache = dir.join("cache");
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret_tar = outside.join("secret.tar");
    std::fs::write(
        &secret_tar,
        tar(&[Entry::File("stolen", b"host".to_vec(), 0o644)]),
    )
    .unwrap();
    let secret: &'static str = Box::leak(secret_tar.display().to_string().into_boxed_str());
    let (base, top) = two_layers();
    type Mangle = Box<dyn FnOnce(&mut serde_json::Value, &mut ::tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Mangle, &str)> = vec![
        (
            "dot-dot-layer",
            Box::new(|e, _| e["Layers"][0] = "../outside/secret.tar".into()),
            "'..'",
        ),
        (
            "symlinked-layer",
            Box::new(move |e, b| {
                let mut h = ::tar::Header::new_gnu();
                h.set_entry_type(::tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                h.set_mtime(1_700_000_000);
                h.set_uid(0);
                h.set_gid(0);
                b.append_link(&mut h, "evil.tar", secret).unwrap();
                e["Layers"][0] = "evil.tar".into();
            }),
            "leads out",
        ),
        (
            "layers-swapped",
            Box::new(|e, _| {
                let l = e["Layers"].as_array_mut().unwrap();
                l.swap(0, 1);
            }),
            "the configuration says",
        ),
        (
            "missing-layer",
            Box::new(|e, _| e["Layers"][1] = "nothere/layer.tar".into()),
            "nothere/layer.tar",
        ),
    ];
    for (name, mangle, why) in cases {
        let archive = dir.join(format!("{name}.tar"));
        write_docker_archive(
            &archive,
            &[base.clone(), top.clone()],
            serde_json::json!({}),
            "t",
            mangle,
        );
        let (code, _, err) = pull(&cache, archive.to_str().unwrap(), &[]);
        assert!(code == 1 && err.contains(why), "{name}: {err}");
    }
    // Truncated archive; an archive entry climbing out.
    let good = dir.join("good.tar");
    write_docker_archive(&good, &[base, top], serde_json::json!({}), "t", |_, _| {});
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = pull(&cache, cut.to_str().unwrap(), &[]);
    assert_eq!(code, 1, "{err}");
    let climbing = dir.join("climbing.tar");
    std::fs::write(
        &climbing,
        tar(&[Entry::RawName("../outside/pwned", b"x".to_vec())]),
    )
    .unwrap();
    let (code, _, err) = pull(&cache, climbing.to_str().unwrap(), &[]);
    assert!(code == 1 && err.contains("'..'"), "{err}");
    let mut left: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["secret.tar"], "nothing written outside");
    // No half-built disk or staging directory left in the cache.
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.') && !name.contains(".tmp"),
            "{name} left in the cache"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's docker-registry on 127.0.0.1, storage in `dir`; killed on drop.
struct Registry {
    child: std::process::Child,
    addr: String,
}

impl Registry {
    fn start(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("storage").display()
        );
        if let Some(h) = htpasswd {
            config += &format!(
                "auth:\n  htpasswd:\n    realm: ligera-test\n    path: {}\n",
                h.display()
            );
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry (Debian's package; resources/setup.sh installs it)");
        let registry = Registry { child, addr };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&registry.addr).is_ok() {
                return registry;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("docker-registry did not listen on {}", registry.addr);
    }

    /// `skopeo copy oci:LAYOUT:TAG docker://ADDR/NAME`.
    fn push(&self, layout: &Path, tag: &str, name: &str, creds: Option<&str>) {
        let mut cmd = std::process::Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{name}", self.addr))
            .output()
            .expect("skopeo (Debian's package; resources/setup.sh installs it)");
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn images_pull_from_a_local_registry_with_and_without_basic_auth() {
    let dir = scratch("registry");
    let cache = dir.join("cache");
    let layout = dir.join("layout");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    write_layout(
        &layout,
        &[
            Layer::gzip(&[
                Entry::Dir("data", 0o755),
                Entry::File("data/big", big.clone(), 0o644),
                Entry::File("data/gone", b"x".to_vec(), 0o644),
            ]),
            Layer::plain(&[
                Entry::File("data/.wh.gone", Vec::new(), 0o644),
                Entry::File("data/hello", b"from the registry".to_vec(), 0o644),
            ]),
        ],
        serde_json::json!({"Cmd": ["/data/hello"], "WorkingDir": "/data"}),
        "v1",
    );

    // Anonymous.
    let open_dir = dir.join("open");
    std::fs::create_dir(&open_dir).unwrap();
    let registry = Registry::start(&open_dir, None);
    registry.push(&layout, "v1", "tests/app:v1", None);
    let reference = format!("{}/tests/app:v1", registry.addr);
    let (code, id, err) = pull(&cache, &reference, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("pulling layer 2/2"), "progress: {err}");
    let disk = cache.join(format!("{id}.ext4"));
    assert_eq!(disk_file(&disk, "/data/big").unwrap(), big);
    assert_eq!(
        disk_file(&disk, "/data/hello").unwrap(),
        b"from the registry"
    );
    assert_eq!(disk_file(&disk, "/data/gone"), None);
    // Cached: the manifest is fetched, no layer is.
    let (code, again, err) = pull(&cache, &reference, &[]);
    assert_eq!((code, again.as_str()), (0, id.as_str()));
    assert!(!err.contains("pulling layer"), "{err}");
    // By digest: the manifest's sha256, as the image id says.
    let manifest = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(manifest.status.success());
    let digest = format!(
        "sha256:{}",
        sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
            &manifest.stdout
        ))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
    );
    assert!(id.ends_with(&digest[7..23]), "{id} vs {digest}");
    let by_digest = format!("{}/tests/app@{digest}", registry.addr);
    assert_eq!(pull(&cache, &by_digest, &[]).1, id);
    // A digest the registry does not have; a tag it does not have.
    let wrong = format!("{}/tests/app@sha256:{}", registry.addr, "0".repeat(64));
    assert_eq!(pull(&cache, &wrong, &[]).0, 1);
    let (code, _, err) = pull(&cache, &format!("{}/tests/app:v2", registry.addr), &[]);
    assert!(code == 1 && err.contains("has no manifests/v2"), "{err}");
    drop(registry);

    // Basic auth, credentials from a Docker client configuration.
    let auth_dir = dir.join("auth");
    std::fs::create_dir(&auth_dir).unwrap();
    let htpasswd = std::process::Command::new("htpasswd")
        .args(["-Bbn", "ligera", "s3cret"])
        .output()
        .expect("htpasswd (Debian's apache2-utils; resources/setup.sh installs it)");
    std::fs::write(auth_dir.join("htpasswd"), &htpasswd.stdout).unwrap();
    let registry = Registry::start(&auth_dir, Some(&auth_dir.join("htpasswd")));
    registry.push(&layout, "v1", "private/app:v1", Some("ligera:s3cret"));
    let reference = format!("{}/private/app:v1", registry.addr);
    let cache2 = dir.join("cache2");
    let docker_config = dir.join("docker");
    std::fs::create_dir(&docker_config).unwrap();
    let (code, _, err) = pull(&cache2, &reference, &[("DOCKER_CONFIG", &docker_config)]);
    assert!(code == 1 && err.contains("docker login"), "{err}");
    let write_auth = |pass: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("ligera:{pass}"));
        let json = serde_json::json!({"auths": {registry.addr.clone(): {"auth": auth}}});
        std::fs::write(docker_config.join("config.json"), json.to_string()).unwrap();
    };
    write_auth("wrong");
    let (code, _, err) = pull(&cache2, &reference, &[("DOCKER_CONFIG", &docker_config)]);
    assert!(code == 1 && err.contains("refused access"), "{err}");
    write_auth("s3cret");
    let (code, id2, err) = pull(&cache2, &reference, &[("DOCKER_CONFIG", &docker_config)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        disk_file(&cache2.join(format!("{id2}.ext4")), "/data/hello").unwrap(),
        b"from the registry"
    );
    drop(registry);
    let _ = std::fs::remove_dir_all(&dir);
}
