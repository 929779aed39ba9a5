//! One syntax for every device flag, as Cloud Hypervisor has it:
//! `--disk path=a.img,readonly=on,id=root`, `--net tap=tap0,mac=...`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{DiskConfig, NetConfig, VsockConfig};

/// `key=value` pairs, each key at most once and from a known set.
pub struct Options {
    values: BTreeMap<String, String>,
}

impl Options {
    /// Parses `text` (comma-separated `key=value`) allowing only `keys`.
    pub fn parse(text: &str, keys: &[&str]) -> Result<Options, String> {
        let mut values = BTreeMap::new();
        for part in text.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("'{part}' is not key=value"));
            };
            if !keys.contains(&key) {
                return Err(format!("unknown key '{key}' (known: {})", keys.join(", ")));
            }
            if value.is_empty() {
                return Err(format!("'{key}' has no value"));
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(format!("'{key}' is given twice"));
            }
        }
        Ok(Options { values })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn required(&self, key: &str) -> Result<&str, String> {
        self.get(key).ok_or_else(|| format!("'{key}=' is required"))
    }

    /// `on`/`off` (also `true`/`false`), or `default` when absent.
    pub fn on_off(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true") => Ok(true),
            Some("off" | "false") => Ok(false),
            Some(other) => Err(format!("'{key}={other}' must be on or off")),
        }
    }
}

/// `--disk path=IMG[,readonly=on][,id=NAME]`
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let o = Options::parse(text, &["path", "readonly", "id"])?;
    let id = o.get("id").map(str::to_string);
    Ok(DiskConfig {
        path: PathBuf::from(o.required("path")?),
        readonly: o.on_off("readonly", false)?,
        id,
    })
}

/// `--net tap=NAME[,mac=MAC]`
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let o = Options::parse(text, &["tap", "mac"])?;
    let tap = o.required("tap")?.to_string();
    let mac = o.get("mac").map(parse_mac).transpose()?;
    Ok(NetConfig { tap, mac, id: None })
}

/// A MAC address like `02:00:00:00:00:01` (whether it is usable is for
/// [`crate::config::VmConfig::validate`]).
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{text}' is not a MAC address like 02:00:00:00:00:01");
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// `--vsock cid=N,socket=PATH`
pub fn parse_vsock(text: &str) -> Result<VsockConfig, String> {
    let o = Options::parse(text, &["cid", "socket"])?;
    let cid_text = o.required("cid")?;
    let cid: u32 = cid_text
        .parse()
        .map_err(|_| format!("cid '{cid_text}' is not a number"))?;
    Ok(VsockConfig {
        cid,
        socket: PathBuf::from(o.required("socket")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d = parse_disk("path=/a.img,readonly=on,id=root").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("root"));
        assert!(!parse_disk("path=b").unwrap().readonly);
        for bad in [
            "",
            "readonly=on",
            "path=a,readonly=maybe",
            "path=a,path=b",
            "path=a,size=3",
            "path=",
            "a.img",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_net("tap=t").unwrap().mac, None);
        for bad in [
            "mac=02:00:00:00:00:01",
            "tap=a,mac=02:00:00:00:00",
            "tap=a,mac=02:00:00:00:00:0g",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vsocks() {
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        for bad in [
            "cid=x,socket=a",
            "cid=3",
            "socket=a",
            "cid=4294967296,socket=a",
        ] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
    }
}
