//! Inputs for the harnesses when the test suite runs them (`engine/tests/fuzz_inputs.rs`,
//! `server/tests/fuzz_inputs.rs`): damaged copies of real encodings, random bytes, and what a
//! local fuzzing run saved. Not used by the fuzz targets, which get their inputs from libFuzzer.

use std::path::Path;

use rand::Rng;
use rand::rngs::StdRng;

/// `seed` itself and `n` damaged copies: bit flips, an interesting value over a field (lengths,
/// counts and offsets live there), truncations, random tails, and a run of one byte.
pub fn mutations(rng: &mut StdRng, seed: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut out = vec![seed.to_vec()];
    for _ in 0..n {
        let mut m = seed.to_vec();
        match rng.random_range(0..5) {
            0 if !m.is_empty() => {
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..m.len());
                    m[i] ^= 1 << rng.random_range(0..8);
                }
            }
            1 if !m.is_empty() => {
                let i = rng.random_range(0..m.len());
                let v: [u8; 4] = match rng.random_range(0..4) {
                    0 => [0xff; 4],
                    1 => [0; 4],
                    2 => 0x8000_0000u32.to_le_bytes(),
                    _ => rng.random(),
                };
                let end = (i + 4).min(m.len());
                m[i..end].copy_from_slice(&v[..end - i]);
            }
            2 => m.truncate(rng.random_range(0..=m.len())),
            3 => {
                let extra = rng.random_range(1..64);
                m.extend((0..extra).map(|_| rng.random::<u8>()));
            }
            _ => {
                if !m.is_empty() {
                    let i = rng.random_range(0..m.len());
                    let len = rng.random_range(0..=(m.len() - i).min(64));
                    m[i..i + len].fill(rng.random());
                }
            }
        }
        out.push(m);
    }
    out
}

/// `n` random inputs of up to `max_len` bytes.
pub fn random_inputs(rng: &mut StdRng, n: usize, max_len: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let len = rng.random_range(0..=max_len);
            (0..len).map(|_| rng.random::<u8>()).collect()
        })
        .collect()
}

/// What a local fuzzing run kept for `target`: its corpus and its crash inputs, if any.
pub fn saved_inputs(target: &str) -> Vec<Vec<u8>> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        out.extend(
            entries
                .flatten()
                .filter_map(|e| std::fs::read(e.path()).ok()),
        );
    }
    out
}
