//! AES-256-GCM throughput of the two implementations at hand, on frames of
//! the codec's size: `cargo run --release --example aead_speed`. A tool
//! for choosing, not a test.
use std::time::Instant;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};

fn main() {
    let frame = 128 << 10;
    let total = 256 << 20;
    let key = [7u8; 32];
    let aad = [3u8; 100];
    let data: Vec<u8> = (0..frame).map(|i| (i * 31 % 251) as u8).collect();
    for round in 0..3 {
        let c = Aes256Gcm::new_from_slice(&key).unwrap();
        let t = Instant::now();
        for i in 0..total / frame {
            let mut b = data.clone();
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&(i as u32).to_be_bytes());
            c.encrypt_in_place(Nonce::from_slice(&n), &aad, &mut b)
                .unwrap();
            c.decrypt_in_place(Nonce::from_slice(&n), &aad, &mut b)
                .unwrap();
        }
        let rc = t.elapsed().as_secs_f64();
        let k = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
        );
        let t = Instant::now();
        for i in 0..total / frame {
            let mut b = data.clone();
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&(i as u32).to_be_bytes());
            k.seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::from(&aad[..]),
                &mut b,
            )
            .unwrap();
            let len = k
                .open_in_place(
                    ring::aead::Nonce::assume_unique_for_key(n),
                    ring::aead::Aad::from(&aad[..]),
                    &mut b,
                )
                .unwrap()
                .len();
            b.truncate(len);
            assert_eq!(b, data);
        }
        let rg = t.elapsed().as_secs_f64();
        let mb = (2 * total) as f64 / 1e6;
        println!(
            "round {round}: aes-gcm crate {:7.1} MB/s   ring {:7.1} MB/s   ({:.2}x)",
            mb / rc,
            mb / rg,
            rc / rg
        );
    }
}
