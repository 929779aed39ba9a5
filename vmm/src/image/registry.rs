//! Pulls from a registry (Docker Registry HTTP API v2 / OCI distribution):
//! `HOST[:PORT]/NAME[:TAG|@DIGEST]`, or a Docker Hub name (`busybox`,
//! `library/busybox:1.36`).
//!
//! The manifest (through an image index or manifest list to the
//! linux/amd64 one) is fetched first; its sha256 is the image's identity,
//! so an image already in the cache costs one request. Otherwise the
//! configuration and layers are downloaded into a temporary OCI image
//! layout, each bounded by its descriptor's size and checked against its
//! digest, and unpacked from there like any layout.
//!
//! Authentication as `docker pull` does it: anonymous first; on a 401, a
//! bearer token from the realm the registry names, or basic auth, with the
//! credentials `docker login` stored in `~/.docker/config.json`
//! (`$DOCKER_CONFIG/config.json`). Plain HTTP only for localhost and
//! 127.0.0.0/8 (and `[::1]`); TLS everywhere else. Authorization headers
//! are not sent along redirects (blob stores).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::{ImageError, RunConfig, cached_image, image_id, oci};

type Result<T> = std::result::Result<T, ImageError>;

/// Largest manifest or token response read.
const MAX_DOC: u64 = 4 << 20;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A parsed registry reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub host: String,
    /// The repository (`library/busybox`).
    pub repo: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(f, "{}/{}{sep}{}", self.host, self.repo, self.reference)
    }
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Reference {
    /// `HOST[:PORT]/NAME[:TAG|@DIGEST]`; the first part is a host when it
    /// has a `.` or `:` or is `localhost`, else the name is Docker Hub's.
    pub fn parse(text: &str) -> Option<Reference> {
        let (rest, reference) = if let Some((rest, digest)) = text.split_once('@') {
            if !is_digest(digest) {
                return None;
            }
            (rest, digest.to_string())
        } else {
            match text.rsplit_once(':') {
                Some((rest, tag)) if !tag.contains('/') => (rest, tag.to_string()),
                _ => (text, "latest".to_string()),
            }
        };
        if !is_digest(&reference)
            && (reference.is_empty()
                || reference.len() > 128
                || !reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return None;
        }
        let (host, repo) = match rest.split_once('/') {
            Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), r.to_string())
            }
            Some(_) => ("docker.io".to_string(), rest.to_string()),
            None => ("docker.io".to_string(), format!("library/{rest}")),
        };
        let name = host.split(':').next().unwrap_or("");
        let host_ok = host == "[::1]"
            || host.starts_with("[::1]:")
            || (!name.is_empty()
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
                && host[name.len()..]
                    .strip_prefix(':')
                    .is_none_or(|port| port.parse::<u16>().is_ok()));
        let repo_ok = !repo.is_empty()
            && repo.len() <= 255
            && repo.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        (host_ok && repo_ok).then_some(Reference {
            host,
            repo,
            reference,
        })
    }

    /// Whether plain HTTP is allowed: localhost and loopback only.
    fn is_local(&self) -> bool {
        let name = self
            .host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(h, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    self.host.as_str()
                }
            });
        name == "localhost"
            || name == "[::1]"
            || name
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback())
    }

    fn base_url(&self) -> String {
        if self.host == "docker.io" {
            "https://registry-1.docker.io".to_string()
        } else if self.is_local() {
            format!("http://{}", self.host)
        } else {
            format!("https://{}", self.host)
        }
    }
}

/// `user:password` for `host` from Docker's client configuration.
fn credentials(host: &str) -> Option<(String, String)> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"),
    };
    let file = std::fs::File::open(path).ok()?;
    let config: serde_json::Value = serde_json::from_reader(file.take(MAX_DOC)).ok()?;
    let auths = config.get("auths")?.as_object()?;
    let keys: Vec<String> = if host == "docker.io" {
        vec!["https://index.docker.io/v1/".into(), "docker.io".into()]
    } else {
        vec![
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
            format!("https://{host}/v1/"),
        ]
    };
    let entry = keys.iter().find_map(|k| auths.get(k))?;
    if let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some((user.to_string(), pass.to_string()));
    }
    let user = entry.get("username")?.as_str()?;
    let pass = entry.get("password")?.as_str()?;
    Some((user.to_string(), pass.to_string()))
}

/// The parameters of a `WWW-Authenticate` challenge: its scheme and
/// `key="value"` pairs.
fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, n)) => (v, n),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        params.push((key, value.to_string()));
        rest = next.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

fn pull_err(r: &Reference, why: impl Into<String>) -> ImageError {
    ImageError::Unsupported {
        path: PathBuf::from(r.to_string()),
        why: why.into(),
    }
}

struct Client<'a> {
    r: &'a Reference,
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
}

impl<'a> Client<'a> {
    fn new(r: &'a Reference) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(!r.is_local())
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("ligera/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            r,
            agent,
            base: r.base_url(),
            authorization: None,
        }
    }

    /// GET `path` under `/v2/NAME/`, authenticating once on a 401.
    fn get(&mut self, path: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}/v2/{}/{path}", self.base, self.r.repo);
        for attempt in 0..2 {
            let mut req = self.agent.get(&url).header("Accept", accept);
            if let Some(a) = &self.authorization {
                req = req.header("Authorization", a);
            }
            let resp = req
                .call()
                .map_err(|e| pull_err(self.r, format!("cannot reach {}: {e}", self.base)))?;
            if resp.status() == 401 && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.authorization = Some(self.authorize(&challenge)?);
                continue;
            }
            return match resp.status().as_u16() {
                200 => Ok(resp),
                401 | 403 => Err(pull_err(
                    self.r,
                    format!(
                        "{} refused access ({}): check the credentials for {} in ~/.docker/config.json",
                        self.base,
                        resp.status(),
                        self.r.host
                    ),
                )),
                404 => Err(pull_err(self.r, format!("{} has no {path}", self.base))),
                s => Err(pull_err(self.r, format!("{url} answered HTTP {s}"))),
            };
        }
        unreachable!("the loop returns on its second pass")
    }

    /// The Authorization header value for a 401's challenge.
    fn authorize(&self, challenge: &str) -> Result<String> {
        let creds = credentials(&self.r.host);
        let (scheme, params) = parse_challenge(challenge);
        let param = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match scheme.as_str() {
            "basic" => {
                let (user, pass) = creds.ok_or_else(|| {
                    pull_err(
                        self.r,
                        format!(
                            "{} wants a user name and password: `docker login {}` stores them in ~/.docker/config.json",
                            self.r.host, self.r.host
                        ),
                    )
                })?;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                Ok(format!("Basic {token}"))
            }
            "bearer" => {
                let realm = param("realm").ok_or_else(|| {
                    pull_err(self.r, "the registry's bearer challenge has no realm")
                })?;
                let realm_local = Reference {
                    host: realm
                        .split("://")
                        .nth(1)
                        .and_then(|r| r.split('/').next())
                        .unwrap_or("")
                        .to_string(),
                    repo: String::new(),
                    reference: String::new(),
                }
                .is_local();
                if !(realm.starts_with("https://") || realm_local && realm.starts_with("http://")) {
                    return Err(pull_err(
                        self.r,
                        format!("the registry's token realm {realm} is not https"),
                    ));
                }
                let scope = param("scope").unwrap_or(format!("repository:{}:pull", self.r.repo));
                let mut req = self.agent.get(&realm).query("scope", &scope);
                if let Some(service) = param("service") {
                    req = req.query("service", &service);
                }
                if let Some((user, pass)) = &creds {
                    let basic =
                        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                    req = req.header("Authorization", &format!("Basic {basic}"));
                }
                let resp = req
                    .call()
                    .map_err(|e| pull_err(self.r, format!("cannot reach {realm}: {e}")))?;
                if resp.status() != 200 {
                    return Err(pull_err(
                        self.r,
                        format!("the token service {realm} answered HTTP {}", resp.status()),
                    ));
                }
                let body = read_limited(self.r, resp, MAX_DOC)?;
                let json: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| pull_err(self.r, format!("the token service's answer: {e}")))?;
                let token = json
                    .get("token")
                    .or_else(|| json.get("access_token"))
                    .and_then(|t| t.as_str())
                    .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
                    .ok_or_else(|| pull_err(self.r, "the token service sent no usable token"))?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(pull_err(
                self.r,
                format!(
                    "{} asks for authentication ('{challenge}') ligera cannot give",
                    self.base
                ),
            )),
        }
    }

    /// The manifest `reference` names: its bytes and media type.
    fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String)> {
        let resp = self.get(&format!("manifests/{reference}"), MANIFEST_TYPES)?;
        let media = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let body = read_limited(self.r, resp, MAX_DOC)?;
        if is_digest(reference) {
            let got = format!("sha256:{}", super::hex(&Sha256::digest(&body)));
            if got != reference {
                return Err(pull_err(
                    self.r,
                    format!("the manifest sent for {reference} has digest {got}"),
                ));
            }
        }
        // The media type in the document wins over the header.
        let declared = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(String::from));
        Ok((body, declared.unwrap_or(media)))
    }

    /// Downloads the blob `digest` of `size` bytes to `dest`, checking both.
    fn blob(&mut self, digest: &str, size: u64, dest: &Path, label: &str) -> Result<()> {
        if !is_digest(digest) {
            return Err(pull_err(
                self.r,
                format!("blob digest {digest} is not sha256"),
            ));
        }
        if size > oci::MAX_UNPACKED {
            return Err(pull_err(
                self.r,
                format!("blob {digest} claims {size} bytes"),
            ));
        }
        let resp = self.get(&format!("blobs/{digest}"), "*/*")?;
        let mut body = resp.into_body().into_reader().take(size + 1);
        let mut file = std::fs::File::create(dest).map_err(|source| ImageError::Io {
            what: "cannot write",
            path: dest.to_path_buf(),
            source,
        })?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        let mut shown = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| pull_err(self.r, format!("downloading {digest}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(|source| ImageError::Io {
                what: "cannot write",
                path: dest.to_path_buf(),
                source,
            })?;
            got += n as u64;
            if got - shown >= 16 << 20 {
                eprintln!(
                    "ligera:   {label}: {} of {} MiB",
                    got >> 20,
                    size.div_ceil(1 << 20)
                );
                shown = got;
            }
        }
        let hex = super::hex(&hasher.finalize());
        if got != size || format!("sha256:{hex}") != digest {
            return Err(pull_err(
                self.r,
                format!("blob {digest}: got {got} bytes with sha256:{hex}, expected {size} bytes"),
            ));
        }
        Ok(())
    }
}

fn read_limited(
    r: &Reference,
    resp: ureq::http::Response<ureq::Body>,
    limit: u64,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    resp.into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| pull_err(r, format!("reading the registry's answer: {e}")))?;
    if out.len() as u64 > limit {
        return Err(pull_err(
            r,
            format!("the registry sent more than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// The linux/amd64 manifest's digest in an image index or manifest list.
fn platform_manifest(r: &Reference, index: &[u8]) -> Result<String> {
    let index: oci_spec::image::ImageIndex =
        serde_json::from_slice(index).map_err(|e| pull_err(r, format!("the image index: {e}")))?;
    index
        .manifests()
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
            })
        })
        .map(|d| d.digest().to_string())
        .ok_or_else(|| pull_err(r, "the image has no linux/amd64 manifest"))
}

/// Pulls `r` (unless its manifest's image is cached) and returns its disk.
pub fn pull(r: &Reference) -> Result<(PathBuf, RunConfig)> {
    let mut client = Client::new(r);
    eprintln!("ligera: resolving {r}");
    let (mut body, mut media) = client.manifest(&r.reference)?;
    if media.contains("index") || media.contains("manifest.list") {
        let digest = platform_manifest(r, &body)?;
        (body, media) = client.manifest(&digest)?;
    }
    let digest = format!("sha256:{}", super::hex(&Sha256::digest(&body)));
    let manifest: oci_spec::image::ImageManifest = serde_json::from_slice(&body)
        .map_err(|e| pull_err(r, format!("the image manifest: {e}")))?;
    cached_image(&image_id(&digest), &r.to_string(), |rootfs| {
        let layout = rootfs.with_file_name("layout");
        let blobs = layout.join("blobs/sha256");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io {
                what: "cannot write",
                path,
                source,
            }
        };
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(blobs.join(hex), &body).map_err(io(&blobs))?;
        let c = manifest.config();
        client.blob(
            c.digest().as_ref(),
            c.size(),
            &blobs.join(c.digest().to_string().trim_start_matches("sha256:")),
            "configuration",
        )?;
        let total = manifest.layers().len();
        for (i, l) in manifest.layers().iter().enumerate() {
            let d = l.digest().to_string();
            let label = format!("layer {}/{total} {}", i + 1, &d[..19.min(d.len())]);
            eprintln!("ligera: pulling {label} ({:.1} MB)", l.size() as f64 / 1e6);
            client.blob(
                &d,
                l.size(),
                &blobs.join(d.trim_start_matches("sha256:")),
                &label,
            )?;
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": media, "digest": digest, "size": body.len()}],
        });
        std::fs::write(layout.join("index.json"), index.to_string()).map_err(io(&layout))?;
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(io(&layout))?;
        oci::unpack(&layout, None, rootfs).map_err(|source| ImageError::Oci {
            path: PathBuf::from(r.to_string()),
            source,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("127.0.0.1:5000/tools/busybox:1.36").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "tools/busybox", "1.36")
        );
        assert!(r.is_local());
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        let r = Reference::parse("localhost/app").unwrap();
        assert_eq!((r.reference.as_str(), r.is_local()), ("latest", true));
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.base_url(), "https://registry-1.docker.io");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("ghcr.io/o/app@{d}")).unwrap();
        assert_eq!(r.reference, d);
        assert!(!r.is_local());
        assert_eq!(r.base_url(), "https://ghcr.io");
        assert_eq!(r.to_string(), format!("ghcr.io/o/app@{d}"));
        // Not references: paths, bad digests, upper case, empty parts.
        for bad in [
            "./rootfs",
            "/abs/path",
            "x@sha256:12",
            "Host.io/App",
            "a//b",
            "host.io/app:",
            "a b",
            "./no/such/dir",
            "../x/y",
            "host..io/x",
            "host.io:99999/x",
        ] {
            assert_eq!(Reference::parse(bad), None, "{bad}");
        }
        // Plain HTTP for loopback only.
        let r = Reference::parse("127.0.0.1.evil.com/x").unwrap();
        assert!(!r.is_local());
        assert_eq!(r.base_url(), "https://127.0.0.1.evil.com");
    }

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(
            p,
            [
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull".into())
            ]
        );
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p.len()), ("basic", 1));
        assert_eq!(parse_challenge("").0, "");
        // Unterminated quotes and garbage end without a panic.
        let _ = parse_challenge(r#"Bearer realm="x,service"#);
        let _ = parse_challenge("Bearer ===,,,=\"");
    }
}
