//! Strings from files, made safe to print: a shared file's metadata must not reach a terminal as
//! escape sequences (clear screen, window title, hyperlinks) or reorder what is shown around it.

/// Characters that change how a terminal shows text rather than being shown: C0 and C1 controls
/// (ESC, CSI, OSC, BEL, CR, ...), DEL, bidirectional overrides and isolates, and other invisible
/// format characters that can hide or reorder text.
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// `s` with every unsafe character replaced by its escape (`\u{1b}`), so nothing is hidden and
/// nothing acts on the terminal. Newlines and tabs are escaped too: one value stays one line.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_unsafe(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`printable`], cut to at most `max` characters (an ellipsis marks the cut).
pub fn printable_short(s: &str, max: usize) -> String {
    let p = printable(s);
    match p.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &p[..at]),
        None => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_overrides_are_shown_not_obeyed() {
        let p = printable("a\u{1b}[2Jb\u{1b}]0;pwned\u{7}c\rd\u{202e}e\u{9b}f\u{7f}\ng");
        assert!(p.chars().all(|c| !is_unsafe(c)), "{p:?}");
        assert!(p.contains("\\u{1b}[2J") && p.contains("\\u{202e}"), "{p}");
        assert_eq!(printable("a photo, ünïcödé ✓"), "a photo, ünïcödé ✓");
        assert_eq!(printable_short("abcdef", 3), "abc…");
    }
}
