//! Keyed records beside the runs (`Space`: schedules, how far they fired, pending
//! notifications): one sled key each, `k` + space + `0x00` + key, the value JSON text.

use crate::error::{EngineError, Result};
use crate::store::{check_keyed, Space};

use super::{readable_key, SledStore};

const KEYED_PREFIX: u8 = b'k';

fn keyed_prefix(space: Space) -> Vec<u8> {
    let mut key = vec![KEYED_PREFIX];
    key.extend_from_slice(space.as_str().as_bytes());
    key.push(0);
    key
}

fn full_key(space: Space, key: &str) -> Vec<u8> {
    let mut full = keyed_prefix(space);
    full.extend_from_slice(key.as_bytes());
    full
}

impl SledStore {
    pub(super) fn write_keyed(&self, space: Space, key: &str, value: &str) -> Result<()> {
        check_keyed(space, key, value)?;
        let _writing = self.writes.begin();
        self.kv.insert(full_key(space, key), value.as_bytes())?;
        Ok(())
    }

    pub(super) fn remove_keyed(&self, space: Space, key: &str) -> Result<()> {
        let _writing = self.writes.begin();
        self.kv.remove(full_key(space, key))?;
        Ok(())
    }

    pub(super) fn read_keyed(&self, space: Space) -> Result<Vec<(String, String)>> {
        let prefix = keyed_prefix(space);
        let mut out = Vec::new();
        for item in self.kv.scan_prefix(&prefix) {
            let (key, value) = item?;
            let text = |bytes: &[u8]| {
                String::from_utf8(bytes.to_vec()).map_err(|_| EngineError::Corrupt {
                    key: readable_key(&key),
                    detail: "a keyed record that is not UTF-8".into(),
                })
            };
            out.push((text(&key[prefix.len()..])?, text(&value)?));
        }
        Ok(out)
    }
}
