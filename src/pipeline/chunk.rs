//! Splitting long documents into overlapping chunks for map-reduce steps.
//!
//! A document too long for one model call is cut into chunks that each fit, with some
//! overlap so that text near a cut is seen whole by at least one call. The number of
//! chunks is bounded: past `max_chunks` the job is refused with (a lower bound of) the
//! count it would need, rather than fanning out into an unbounded number of provider calls.

/// Boundaries to end a chunk on, best first; a chunk ends just after the separator.
const BREAKS: [&[&str]; 3] = [&["\n\n"], &["\n"], &[". ", "! ", "? "]];

/// The overlap actually used: `overlap < size` is the caller's guarantee; if not, half the size.
fn effective_overlap(size: usize, overlap: usize) -> usize {
    if overlap < size {
        overlap
    } else {
        size / 2
    }
}

/// How many chunks `len` units make when every cut is a hard cut (the fewest possible).
fn hard_cut_count(len: usize, size: usize, overlap: usize) -> usize {
    if len <= size {
        1
    } else {
        1 + (len - size).div_ceil(size - overlap)
    }
}

fn too_many(needed: usize, size: usize, unit: &str, max_chunks: usize) -> String {
    format!("document needs at least {needed} chunks of {size} {unit}; the limit is {max_chunks}")
}

/// Splits `text` into chunks of at most `size` characters (chars, not bytes), each chunk
/// after the first starting `overlap` characters before the previous one ended (if
/// `overlap >= size`, half of `size` is used). A chunk preferably ends at a paragraph
/// break, else a line break, else a sentence end, else whitespace, searched within the last
/// 20% of the window; otherwise it is cut at `size`. If a boundary would leave the next
/// chunk starting no later than this one, the chunk is cut at `size` instead, so the split
/// always advances. Chunks are trimmed (the overlap counts untrimmed positions);
/// whitespace-only pieces are dropped. Err when more than `max_chunks` chunks are needed,
/// with a lower bound of how many (counting the rest as hard cuts keeps this fast), or
/// when `size` is 0.
pub fn by_chars(
    text: &str,
    size: usize,
    overlap: usize,
    max_chunks: usize,
) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    if size == 0 {
        return Err("chunk size must be at least 1 character".to_string());
    }
    let overlap = effective_overlap(size, overlap);
    let chars: Vec<char> = text.chars().collect();
    // Byte offset of each char, and of the end: slicing at these never splits a character.
    let bytes: Vec<usize> = text
        .char_indices()
        .map(|(b, _)| b)
        .chain([text.len()])
        .collect();
    let n = chars.len();
    let mut chunks = Vec::new();
    let mut start = 0;
    loop {
        let hard_end = (start + size).min(n);
        let mut end = hard_end;
        if hard_end < n {
            if let Some(e) = find_break(&chars, start, hard_end, size) {
                if e.saturating_sub(overlap) > start {
                    end = e;
                }
            }
        }
        let piece = bytes
            .get(start)
            .zip(bytes.get(end))
            .and_then(|(&a, &b)| text.get(a..b))
            .map(str::trim)
            .unwrap_or_default();
        if !piece.is_empty() {
            if chunks.len() == max_chunks {
                let needed = max_chunks + hard_cut_count(n - start, size, overlap);
                return Err(too_many(needed, size, "characters", max_chunks));
            }
            chunks.push(piece.to_string());
        }
        if end >= n {
            return Ok(chunks);
        }
        // end - overlap > start: a boundary is only used when it advances, and a hard cut
        // advances by size - overlap >= 1.
        start = end - overlap;
    }
}

/// The best place to end a chunk covering `start..hard_end`, searching the last 20% of the
/// window: the char index just after the latest separator of the best kind found there.
fn find_break(chars: &[char], start: usize, hard_end: usize, size: usize) -> Option<usize> {
    let lo = hard_end.saturating_sub(size / 5).max(start + 1);
    let ends_with = |e: usize, sep: &str| {
        let len = sep.chars().count();
        e.checked_sub(len)
            .filter(|&s| s >= start)
            .and_then(|s| chars.get(s..e))
            .is_some_and(|w| w.iter().copied().eq(sep.chars()))
    };
    for seps in BREAKS {
        if let Some(e) = (lo..=hard_end)
            .rev()
            .find(|&e| seps.iter().any(|s| ends_with(e, s)))
        {
            return Some(e);
        }
    }
    (lo..=hard_end).rev().find(|&e| {
        e.checked_sub(1)
            .and_then(|k| chars.get(k))
            .is_some_and(|c| c.is_whitespace())
    })
}

/// The same over a token sequence: `encode` turns text into token ids, `decode` turns a
/// slice back into text. Chunks are `size` tokens with `overlap` tokens shared, no boundary
/// preference. When a slice does not decode (e.g. it cuts a multi-byte character in a
/// byte-level vocabulary), up to 3 tokens are added at its start and dropped at its end until
/// it does; Err if none of those decodes.
pub fn by_tokens(
    text: &str,
    size: usize,
    overlap: usize,
    max_chunks: usize,
    encode: &dyn Fn(&str) -> Vec<u32>,
    decode: &dyn Fn(&[u32]) -> Option<String>,
) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    if size == 0 {
        return Err("chunk size must be at least 1 token".to_string());
    }
    let overlap = effective_overlap(size, overlap);
    let tokens = encode(text);
    let n = tokens.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let needed = hard_cut_count(n, size, overlap);
    if needed > max_chunks {
        return Err(too_many(needed, size, "tokens", max_chunks));
    }
    let mut chunks: Vec<String> = Vec::new();
    let mut start = 0;
    loop {
        let hard_end = (start + size).min(n);
        let (end, piece) = decode_near(&tokens, start, hard_end, decode).ok_or_else(|| {
            format!("tokens {start}..{hard_end} of the document do not decode back to text")
        })?;
        let piece = piece.trim();
        if !piece.is_empty() {
            if chunks.len() == max_chunks {
                let needed = max_chunks + hard_cut_count(n - start, size, overlap);
                return Err(too_many(needed, size, "tokens", max_chunks));
            }
            chunks.push(piece.to_string());
        }
        if end >= n {
            return Ok(chunks);
        }
        start = end.saturating_sub(overlap).max(start + 1);
    }
}

/// Decodes `tokens[start..end]`, or failing that the nearest slice that starts up to 3
/// tokens earlier and ends up to 3 tokens earlier (never empty). Returns the end used.
fn decode_near(
    tokens: &[u32],
    start: usize,
    end: usize,
    decode: &dyn Fn(&[u32]) -> Option<String>,
) -> Option<(usize, String)> {
    (0..=3).find_map(|drop_end| {
        let e = end.checked_sub(drop_end).filter(|&e| e > start)?;
        (0..=3).find_map(|add_start| {
            let s = start.checked_sub(add_start)?;
            let slice = tokens.get(s..e).filter(|t| !t.is_empty())?;
            decode(slice).map(|text| (e, text))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> usize {
        s.chars().count()
    }

    #[test]
    fn empty_and_short() {
        assert!(by_chars("", 10, 2, 5).unwrap().is_empty());
        assert!(by_chars(" \n\t ", 10, 2, 5).unwrap().is_empty());
        assert_eq!(by_chars("  hello  ", 100, 10, 1).unwrap(), ["hello"]);
        assert!(by_chars("abc", 0, 0, 5).unwrap_err().contains("at least 1"));
    }

    #[test]
    fn hard_cut_overlap_ascii() {
        let text = "abcdefghijklmnopqrstuvwxyz";
        let chunks = by_chars(text, 10, 3, 100).unwrap();
        assert_eq!(chunks, ["abcdefghij", "hijklmnopq", "opqrstuvwx", "vwxyz"]);
        for pair in chunks.windows(2) {
            let tail: String = pair[0].chars().skip(7).collect();
            assert!(pair[1].starts_with(&tail));
        }
    }

    #[test]
    fn multibyte_never_split() {
        let text = "漢字かな交じり文😀😀🎉テキスト".repeat(5);
        let chunks = by_chars(&text, 7, 2, 100).unwrap();
        assert!(chunks.iter().all(|c| chars(c) <= 7));
        for pair in chunks.windows(2) {
            let tail: String = pair[0].chars().skip(chars(&pair[0]) - 2).collect();
            assert!(pair[1].starts_with(&tail), "{pair:?}");
        }
        // Every character is covered: stripping each chunk's overlap rebuilds the text.
        let mut rebuilt: String = chunks[0].clone();
        for c in &chunks[1..] {
            rebuilt.extend(c.chars().skip(2));
        }
        assert_eq!(rebuilt, text);
    }

    #[test]
    fn boundary_preference() {
        // A paragraph break beats a later line break and sentence end inside the last 20%.
        let text = format!("{}\n\nxx\nyy. zz {}", "a".repeat(80), "b".repeat(100));
        let chunks = by_chars(&text, 100, 0, 10).unwrap();
        assert_eq!(chunks[0], "a".repeat(80));
        // Without a paragraph break: the line break.
        let text = format!("{}. x\nyy zz{}", "a".repeat(85), "b".repeat(100));
        assert_eq!(
            by_chars(&text, 100, 0, 10).unwrap()[0],
            format!("{}. x", "a".repeat(85))
        );
        // Sentence end, then whitespace.
        let text = format!("{}! yy zz{}", "a".repeat(85), "b".repeat(100));
        assert_eq!(
            by_chars(&text, 100, 0, 10).unwrap()[0],
            format!("{}!", "a".repeat(85))
        );
        let text = format!("{} yy{}", "a".repeat(85), "b".repeat(100));
        assert_eq!(by_chars(&text, 100, 0, 10).unwrap()[0], "a".repeat(85));
        // A break before the last 20% is ignored: hard cut.
        let text = format!("{}\n\n{}", "a".repeat(50), "b".repeat(100));
        assert_eq!(chars(&by_chars(&text, 100, 0, 10).unwrap()[0]), 100);
    }

    #[test]
    fn overlap_is_on_untrimmed_positions() {
        let text = "one two three four five six seven eight nine ten";
        let chunks = by_chars(text, 12, 4, 100).unwrap();
        assert!(chunks.iter().all(|c| chars(c) <= 12 && c.trim() == c));
        for w in text.split(' ') {
            assert!(chunks.iter().any(|c| c.contains(w)), "{w} lost");
        }
    }

    #[test]
    fn always_advances() {
        // Overlap nearly the size with a break early in every window.
        let text = "a b c d e f g h i j k l m n o p".repeat(3);
        let chunks = by_chars(&text, 10, 9, 10_000).unwrap();
        assert!(chunks.len() < text.len());
        // overlap >= size is taken as size / 2.
        let chunks = by_chars("abcdefghij", 4, 4, 100).unwrap();
        assert_eq!(chunks, ["abcd", "cdef", "efgh", "ghij"]);
    }

    #[test]
    fn tiny_size() {
        assert_eq!(by_chars("a😀c", 1, 0, 10).unwrap(), ["a", "😀", "c"]);
        assert_eq!(by_chars("abc", 1, 5, 10).unwrap(), ["a", "b", "c"]);
        assert_eq!(by_chars("a b", 1, 0, 10).unwrap(), ["a", "b"]);
    }

    #[test]
    fn max_chunks_error() {
        let text = "x".repeat(100);
        assert_eq!(by_chars(&text, 10, 0, 10).unwrap().len(), 10);
        assert_eq!(
            by_chars(&text, 10, 0, 3).unwrap_err(),
            "document needs at least 10 chunks of 10 characters; the limit is 3"
        );
        assert!(by_chars(&text, 10, 5, 0)
            .unwrap_err()
            .contains("needs at least 19 chunks"));
        // Stops at the limit instead of walking a huge document one char at a time.
        let big = "ab ".repeat(200_000);
        let err = by_chars(&big, 1000, 999, 3).unwrap_err();
        assert!(err.contains("needs at least 599001 chunks"), "{err}");
    }

    fn encode(s: &str) -> Vec<u32> {
        s.split_whitespace()
            .filter_map(|w| w.strip_prefix('w')?.parse().ok())
            .collect()
    }

    fn decode(t: &[u32]) -> Option<String> {
        Some(
            t.iter()
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    fn words(n: u32) -> String {
        (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tokens_with_overlap() {
        let chunks = by_tokens(&words(10), 4, 1, 10, &encode, &decode).unwrap();
        assert_eq!(chunks, ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]);
        let chunks = by_tokens(&words(11), 4, 1, 10, &encode, &decode).unwrap();
        assert_eq!(chunks.last().map(String::as_str), Some("w9 w10"));
        assert_eq!(
            by_tokens(&words(3), 4, 1, 1, &encode, &decode).unwrap(),
            ["w0 w1 w2"]
        );
        assert!(by_tokens("  ", 4, 1, 1, &encode, &decode)
            .unwrap()
            .is_empty());
        assert_eq!(
            by_tokens(&words(4), 2, 9, 10, &encode, &decode)
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn tokens_limits() {
        let err = by_tokens(&words(10), 4, 1, 2, &encode, &decode).unwrap_err();
        assert_eq!(
            err,
            "document needs at least 3 chunks of 4 tokens; the limit is 2"
        );
        assert!(by_tokens(&words(3), 0, 0, 2, &encode, &decode).is_err());
    }

    #[test]
    fn tokens_undecodable_edges() {
        // Slices that end on an odd id or start on id 5 do not decode.
        let picky = |t: &[u32]| {
            let bad = t.last().is_some_and(|l| l % 2 == 1) || t.first() == Some(&5);
            if bad {
                None
            } else {
                decode(t)
            }
        };
        let chunks = by_tokens(&words(13), 4, 1, 10, &encode, &picky).unwrap();
        assert_eq!(
            chunks,
            [
                "w0 w1 w2",
                "w2 w3 w4",
                "w4 w5 w6",
                "w6 w7 w8",
                "w8 w9 w10",
                "w10 w11 w12"
            ]
        );
        let chunks = by_tokens(&words(13), 5, 0, 10, &encode, &picky).unwrap();
        assert_eq!(
            chunks,
            ["w0 w1 w2 w3 w4", "w4 w5 w6 w7 w8", "w9 w10 w11 w12"]
        );
        let never = |_: &[u32]| None;
        assert!(by_tokens(&words(5), 4, 1, 10, &encode, &never)
            .unwrap_err()
            .contains("do not decode"));
    }
}
