//! PostgreSQL data pages: the page checksum (storage/checksum_impl.h) and the
//! few header fields base backups look at. Little-endian, 8 KiB pages.

pub const BLCKSZ: usize = 8192;
/// Blocks per relation segment file (1 GiB / 8 KiB).
pub const RELSEG_BLOCKS: u32 = 131_072;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline(always)]
fn comp(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// pg_checksum_page: the checksum PostgreSQL stores in pd_checksum.
/// Every page of a backup goes through it: with AVX2 (checked at run time)
/// the 32 lanes are computed 8 at a time.
pub fn checksum(page: &[u8], blkno: u32) -> u16 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { checksum_avx2(page, blkno) };
    }
    checksum_lanes(page, blkno)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn checksum_avx2(page: &[u8], blkno: u32) -> u16 {
    checksum_lanes(page, blkno)
}

/// Written so that the compiler vectorises it: fixed-size rows, no branch
/// in the loop (pd_checksum, bytes 8..10 of the first row, counts as zero).
#[inline(always)]
fn checksum_lanes(page: &[u8], blkno: u32) -> u16 {
    // Whole rows only: a short page (never passed, but) cannot panic.
    let mut sums = BASE_OFFSETS;
    let mut rows = page.chunks_exact(4 * N_SUMS);
    if let Some(first) = rows.next() {
        let mut row = [0u8; 4 * N_SUMS];
        row.copy_from_slice(first);
        row[8] = 0;
        row[9] = 0;
        mix_row(&mut sums, &row);
    }
    for row in rows {
        if let Ok(row) = <&[u8; 4 * N_SUMS]>::try_from(row) {
            mix_row(&mut sums, row);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            *sum = comp(*sum, 0);
        }
    }
    let result = sums.iter().fold(0u32, |a, s| a ^ s) ^ blkno;
    ((result % 65535) + 1) as u16
}

#[inline(always)]
fn mix_row(sums: &mut [u32; N_SUMS], row: &[u8; 4 * N_SUMS]) {
    for (sum, w) in sums.iter_mut().zip(row.chunks_exact(4)) {
        *sum = comp(*sum, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
}

/// Little-endian bytes `at..at+N` of a page, zero past its end: callers
/// pass whole pages, but a short slice must not panic.
fn field<const N: usize>(page: &[u8], at: usize) -> [u8; N] {
    page.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; N])
}

pub fn stored_checksum(page: &[u8]) -> u16 {
    u16::from_le_bytes(field(page, 8))
}

/// pd_lsn as a 64-bit LSN.
pub fn lsn(page: &[u8]) -> u64 {
    let hi = u32::from_le_bytes(field(page, 0));
    let lo = u32::from_le_bytes(field(page, 4));
    (u64::from(hi) << 32) | u64::from(lo)
}

/// PageIsNew: pd_upper == 0 (an all-zero page, not yet initialised).
pub fn is_new(page: &[u8]) -> bool {
    u16::from_le_bytes(field(page, 14)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_depends_on_content_block_and_ignores_its_own_field() {
        let mut p = vec![0u8; BLCKSZ];
        p[14] = 0x20; // pd_upper
        p[100] = 7;
        let c = checksum(&p, 0);
        assert_ne!(c, checksum(&p, 1));
        p[8] = 0xAB;
        p[9] = 0xCD;
        assert_eq!(checksum(&p, 0), c);
        p[101] = 1;
        assert_ne!(checksum(&p, 0), c);
        assert_ne!(c, 0);
    }

    /// PostgreSQL's loop as written in checksum_impl.h, one lane at a time.
    fn checksum_reference(page: &[u8], blkno: u32) -> u16 {
        let mut sums = BASE_OFFSETS;
        for (i, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
            for (j, sum) in sums.iter_mut().enumerate() {
                let off = 4 * j;
                let mut w = [row[off], row[off + 1], row[off + 2], row[off + 3]];
                if i == 0 && j == 2 {
                    w[0] = 0;
                    w[1] = 0;
                }
                *sum = comp(*sum, u32::from_le_bytes(w));
            }
        }
        for _ in 0..2 {
            for sum in sums.iter_mut() {
                *sum = comp(*sum, 0);
            }
        }
        let result = sums.iter().fold(0u32, |a, s| a ^ s) ^ blkno;
        ((result % 65535) + 1) as u16
    }

    #[test]
    fn vectorised_checksum_matches_the_reference() {
        let mut x = 0x9E37_79B9u32;
        for blkno in [0, 1, 7, 131_071, u32::MAX] {
            let p: Vec<u8> = (0..BLCKSZ)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            assert_eq!(checksum(&p, blkno), checksum_reference(&p, blkno));
            assert_eq!(checksum_lanes(&p, blkno), checksum_reference(&p, blkno));
        }
    }

    #[test]
    fn short_pages_do_not_panic() {
        for p in [&[][..], &[1u8; 9][..], &[0xFF; 15][..]] {
            let _ = (stored_checksum(p), lsn(p), is_new(p), checksum(p, u32::MAX));
        }
    }
}
