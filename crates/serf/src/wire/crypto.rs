//! Gossip encryption exactly as memberlist's keyring does it (ml/security.go, ml/keyring.go):
//! AES-GCM with a 12-byte random nonce, keys of 16, 24 or 32 bytes, the first key (the primary)
//! used to encrypt, every key tried to decrypt.
//!
//! UDP: `vsn | nonce | ciphertext+tag`, no associated data. Streams: `0a | len u32 BE | vsn |
//! nonce | ciphertext+tag`, the 5 header bytes as associated data. Version 1 (what Go sends)
//! has no padding; version 0 pads the plaintext PKCS#7-style to 16 bytes. Nonces come from the
//! caller, so this module stays deterministic.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes192;
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm, Nonce};

use super::memberlist::kind;
use super::stream::MAX_STREAM_BYTES;
use super::DecodeError;

type Aes192Gcm = AesGcm<Aes192, aes_gcm::aead::consts::U12>;

/// Bytes of nonce.
pub const NONCE_SIZE: usize = 12;
/// Bytes of GCM tag.
const TAG_SIZE: usize = 16;
/// Bytes encryption adds to a UDP packet (version 1: version byte, nonce, tag).
pub const PACKET_OVERHEAD: usize = 1 + NONCE_SIZE + TAG_SIZE;
/// The encryption version we send (memberlist protocol ≥ 2 sends 1).
const VERSION: u8 = 1;
const STREAM_HEADER: usize = 5;

/// Why a key or keyring operation was refused. The keyring is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// A key that is not 16, 24 or 32 bytes.
    #[error("key size must be 16, 24 or 32 bytes, not {0}")]
    KeySize(usize),
    /// `remove` of the primary key (Go's text).
    #[error("Removing the primary key is not allowed")]
    RemovePrimary,
    /// `use` or `remove` of a key that is not installed.
    #[error("Requested key is not in the keyring")]
    NotInstalled,
    /// A keyring needs at least one key.
    #[error("empty keyring")]
    Empty,
}

#[derive(Clone)]
enum Cipher {
    Aes128(Box<Aes128Gcm>),
    Aes192(Box<Aes192Gcm>),
    Aes256(Box<Aes256Gcm>),
}

impl Cipher {
    fn new(key: &[u8]) -> Result<Self, KeyringError> {
        let invalid = |_| KeyringError::KeySize(key.len());
        Ok(match key.len() {
            16 => Self::Aes128(Box::new(Aes128Gcm::new_from_slice(key).map_err(invalid)?)),
            24 => Self::Aes192(Box::new(Aes192Gcm::new_from_slice(key).map_err(invalid)?)),
            32 => Self::Aes256(Box::new(Aes256Gcm::new_from_slice(key).map_err(invalid)?)),
            other => return Err(KeyringError::KeySize(other)),
        })
    }

    fn seal(&self, nonce: &[u8; NONCE_SIZE], msg: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce = Nonce::from_slice(nonce);
        let payload = Payload { msg, aad };
        let sealed = match self {
            Self::Aes128(cipher) => cipher.encrypt(nonce, payload),
            Self::Aes192(cipher) => cipher.encrypt(nonce, payload),
            Self::Aes256(cipher) => cipher.encrypt(nonce, payload),
        };
        sealed.expect("AES-GCM sealing into a Vec cannot fail")
    }

    fn open(&self, nonce: &[u8], msg: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let nonce = Nonce::from_slice(nonce);
        let payload = Payload { msg, aad };
        match self {
            Self::Aes128(cipher) => cipher.decrypt(nonce, payload),
            Self::Aes192(cipher) => cipher.decrypt(nonce, payload),
            Self::Aes256(cipher) => cipher.decrypt(nonce, payload),
        }
        .ok()
    }
}

/// An installed key: its bytes and its cipher.
#[derive(Clone)]
struct Key {
    bytes: Vec<u8>,
    cipher: Cipher,
}

/// An ordered set of keys; the first is the primary.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Keyring({} keys)", self.keys.len())
    }
}

impl Keyring {
    /// A keyring with `keys`, the first the primary.
    pub fn new<K: AsRef<[u8]>>(keys: &[K]) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut keyring = Self { keys: Vec::new() };
        for key in keys {
            keyring.add(key.as_ref())?;
        }
        Ok(keyring)
    }

    /// Installs a key (appended; the first key installed is the primary). Idempotent.
    pub fn add(&mut self, key: &[u8]) -> Result<(), KeyringError> {
        let cipher = Cipher::new(key)?;
        if !self.keys.iter().any(|k| k.bytes == key) {
            self.keys.push(Key {
                bytes: key.to_vec(),
                cipher,
            });
        }
        Ok(())
    }

    /// Makes an installed key the primary.
    pub fn use_key(&mut self, key: &[u8]) -> Result<(), KeyringError> {
        let index = self.position(key)?;
        let key = self.keys.remove(index);
        self.keys.insert(0, key);
        Ok(())
    }

    /// Removes a key other than the primary; removing a key that is not installed is a no-op
    /// (as memberlist's `RemoveKey`).
    pub fn remove(&mut self, key: &[u8]) -> Result<(), KeyringError> {
        if self.keys[0].bytes == key {
            return Err(KeyringError::RemovePrimary);
        }
        self.keys.retain(|k| k.bytes != key);
        Ok(())
    }

    fn position(&self, key: &[u8]) -> Result<usize, KeyringError> {
        self.keys
            .iter()
            .position(|k| k.bytes == key)
            .ok_or(KeyringError::NotInstalled)
    }

    /// The installed keys, primary first.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.iter().map(|k| k.bytes.as_slice())
    }

    /// The primary key.
    pub fn primary(&self) -> &[u8] {
        &self.keys[0].bytes
    }

    /// Encrypts a UDP packet with the primary key.
    pub fn encrypt_packet(&self, nonce: [u8; NONCE_SIZE], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(PACKET_OVERHEAD + plaintext.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&self.keys[0].cipher.seal(&nonce, plaintext, &[]));
        out
    }

    /// Decrypts a UDP packet with whichever installed key opens it.
    pub fn decrypt_packet(&self, packet: &[u8]) -> Result<Vec<u8>, DecodeError> {
        self.open(packet, &[])
    }

    /// Encrypts a stream message into one frame (`0a | len | …`, header as associated data).
    pub fn encrypt_stream(&self, nonce: [u8; NONCE_SIZE], plaintext: &[u8]) -> Vec<u8> {
        let len = 1 + NONCE_SIZE + plaintext.len() + TAG_SIZE;
        let mut out = Vec::with_capacity(STREAM_HEADER + len);
        out.push(kind::ENCRYPT);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        let aad = out.clone();
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&self.keys[0].cipher.seal(&nonce, plaintext, &aad));
        out
    }

    /// Decrypts the stream frame at the start of `buf`: `Ok(None)` when incomplete, else the
    /// plaintext and the bytes the frame took.
    pub fn decrypt_stream(&self, buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, DecodeError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf[0] != kind::ENCRYPT {
            return Err(DecodeError::Encrypted(
                "Encryption is configured but remote state is not encrypted".into(),
            ));
        }
        let Some(header) = buf.get(..STREAM_HEADER) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_STREAM_BYTES {
            return Err(DecodeError::TooLarge {
                what: "encrypted stream frame",
                len: len as u64,
                limit: MAX_STREAM_BYTES as u64,
            });
        }
        let Some(body) = buf.get(STREAM_HEADER..STREAM_HEADER + len) else {
            return Ok(None);
        };
        Ok(Some((self.open(body, header)?, STREAM_HEADER + len)))
    }

    fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let version = *sealed.first().ok_or_else(|| too_small(0))?;
        let min = match version {
            0 => PACKET_OVERHEAD + 16,
            1 => PACKET_OVERHEAD,
            other => {
                return Err(DecodeError::Encrypted(format!(
                    "unsupported encryption version {other}"
                )))
            }
        };
        if sealed.len() < min {
            return Err(too_small(sealed.len()));
        }
        let nonce = &sealed[1..1 + NONCE_SIZE];
        let ciphertext = &sealed[1 + NONCE_SIZE..];
        for key in &self.keys {
            if let Some(mut plain) = key.cipher.open(nonce, ciphertext, aad) {
                if version == 0 {
                    strip_padding(&mut plain)?;
                }
                return Ok(plain);
            }
        }
        Err(DecodeError::Encrypted(
            "no installed key decrypts the message".into(),
        ))
    }
}

/// Called after a key query changed the ring (e.g. to rewrite `-keyring-file`); an error
/// text is reported back to the asker as the member's failure.
pub type ChangeHook = Arc<dyn Fn(&Keyring) -> Result<(), String> + Send + Sync>;

/// A keyring shared by the driver (which encrypts and decrypts with it) and the Serf layer
/// (which changes it when a key query arrives). Cheap to clone; every clone is the same ring.
#[derive(Clone)]
pub struct SharedKeyring {
    ring: Arc<RwLock<Keyring>>,
    on_change: Option<ChangeHook>,
}

impl std::fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shared{:?}", *self.read())
    }
}

impl SharedKeyring {
    /// Shares `keyring`.
    pub fn new(keyring: Keyring) -> Self {
        Self {
            ring: Arc::new(RwLock::new(keyring)),
            on_change: None,
        }
    }

    /// Calls `hook` with the new ring after every change made by a key query (Go's
    /// `writeKeyringFile`). The hook runs in the driver loop: keep it short.
    pub fn with_on_change(
        mut self,
        hook: impl Fn(&Keyring) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.on_change = Some(Arc::new(hook));
        self
    }

    /// Reads the ring (a poisoned lock is still read: the ring is never left half-changed).
    pub fn read(&self) -> RwLockReadGuard<'_, Keyring> {
        self.ring
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes the ring with `change`, then runs the change hook if the change succeeded.
    pub fn modify(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<(), KeyringError>,
    ) -> Result<(), String> {
        let mut ring = self
            .ring
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut ring).map_err(|error| error.to_string())?;
        match &self.on_change {
            Some(hook) => hook(&ring),
            None => Ok(()),
        }
    }
}

fn too_small(len: usize) -> DecodeError {
    DecodeError::Encrypted(format!("Payload is too small to decrypt: {len}"))
}

fn strip_padding(plain: &mut Vec<u8>) -> Result<(), DecodeError> {
    let pad = usize::from(*plain.last().ok_or_else(|| too_small(0))?);
    if pad == 0 || pad > 16 || pad > plain.len() {
        return Err(DecodeError::Encrypted(format!("invalid padding {pad}")));
    }
    plain.truncate(plain.len() - pad);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::memberlist::tests::unhex;

    const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    const V1_PING: &str = "0085a44e6f6465a161a55365714e6f01aa536f7572636541646472a47f000002aa536f757263654e6f6465a162aa536f75726365506f7274cd1f0a";
    const V7: &str = "01c582dd2ee6c4a0e9adcd86cb0f590a0e7f0177779f60a22fd3502e66f3c8720dc6cb6b676148e75317d4001a3628a996bba2c12c92905218bb7f4b738ba2a2c647a5049578c20e3637505aff6893d92c5b8f94c6bc6c96";

    #[test]
    fn v7_encrypted_ping_both_ways() {
        let keyring = Keyring::new(&[KEY]).unwrap();
        assert_eq!(keyring.decrypt_packet(&unhex(V7)).unwrap(), unhex(V1_PING));
        let nonce: [u8; 12] = unhex("c582dd2ee6c4a0e9adcd86cb").try_into().unwrap();
        assert_eq!(keyring.encrypt_packet(nonce, &unhex(V1_PING)), unhex(V7));
    }

    #[test]
    fn any_installed_key_decrypts_and_wrong_keys_fail() {
        let other = [9u8; 32];
        let mut sender = Keyring::new(&[other]).unwrap();
        let packet = sender.encrypt_packet([7; 12], b"hello");
        let mut receiver = Keyring::new(&[KEY]).unwrap();
        assert!(receiver.decrypt_packet(&packet).is_err());
        receiver.add(&other).unwrap();
        assert_eq!(receiver.decrypt_packet(&packet).unwrap(), b"hello");
        // Rotation: use the new key, then the old one can go.
        receiver.use_key(&other).unwrap();
        assert_eq!(receiver.remove(&other), Err(KeyringError::RemovePrimary));
        receiver.remove(&KEY).unwrap();
        assert_eq!(receiver.keys().count(), 1);
        sender.add(&[1; 24]).unwrap();
        sender.use_key(&[1; 24]).unwrap();
        assert!(receiver
            .decrypt_packet(&sender.encrypt_packet([1; 12], b"x"))
            .is_err());
        assert_eq!(
            Keyring::new(&[[0u8; 15]]).unwrap_err(),
            KeyringError::KeySize(15)
        );
        assert!(matches!(
            receiver.decrypt_packet(&[1, 2, 3]),
            Err(DecodeError::Encrypted(_))
        ));
    }

    #[test]
    fn stream_frames_use_the_header_as_associated_data() {
        let keyring = Keyring::new(&[KEY]).unwrap();
        let mut frame = keyring.encrypt_stream([3; 12], b"push-pull bytes");
        for cut in 0..frame.len() {
            assert_eq!(keyring.decrypt_stream(&frame[..cut]).unwrap(), None);
        }
        let len = frame.len();
        frame.extend_from_slice(b"more");
        assert_eq!(
            keyring.decrypt_stream(&frame).unwrap(),
            Some((b"push-pull bytes".to_vec(), len))
        );
        // Changing the length header breaks authentication.
        let mut tampered = frame.clone();
        tampered[4] += 1;
        assert!(keyring.decrypt_stream(&tampered).is_err());
        assert!(keyring.decrypt_stream(&[0x06, 0x80]).is_err());
    }
}
