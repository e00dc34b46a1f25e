//! Text measures IFEval's checks share: sentences, words, word tokens, letter case and
//! language, each as close to the Python original (`instructions_util.py`, NLTK, `str.isupper`,
//! langdetect) as a dependency-light Rust port gets.

use std::sync::LazyLock;

use regex::{Captures, Regex};

/// A fixed pattern, compiled (a bad one is a bug).
pub(super) fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("valid pattern")
}

/// The rewrites of `split_into_sentences`, in its order: a pattern and its replacement.
static SENTENCE_RULES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    const ALPHA: &str = "([A-Za-z])";
    const SUFFIXES: &str = "(Inc|Ltd|Jr|Sr|Co)";
    const STARTERS: &str = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)";
    const ACRONYMS: &str = "([A-Z][.][A-Z][.](?:[A-Z][.])?)";
    vec![
        (re("(Mr|St|Mrs|Ms|Dr)[.]"), "${1}<prd>"),
        (re("[.](com|net|org|io|gov|edu|me)"), "<prd>${1}"),
        (re("([0-9])[.]([0-9])"), "${1}<prd>${2}"),
        (re(&format!(r"\s{ALPHA}[.] ")), " ${1}<prd> "),
        (re(&format!("{ACRONYMS} {STARTERS}")), "${1}<stop> ${2}"),
        (re(&format!("{ALPHA}[.]{ALPHA}[.]{ALPHA}[.]")), "${1}<prd>${2}<prd>${3}<prd>"),
        (re(&format!("{ALPHA}[.]{ALPHA}[.]")), "${1}<prd>${2}<prd>"),
        (re(&format!(" {SUFFIXES}[.] {STARTERS}")), " ${1}<stop> ${2}"),
        (re(&format!(" {SUFFIXES}[.]")), " ${1}<prd>"),
        (re(&format!(" {ALPHA}[.]")), " ${1}<prd>"),
    ]
});

/// IFEval's rule-based sentence splitter (`instructions_util.split_into_sentences`): periods
/// of titles, websites, decimals, ellipses, initials and acronyms are kept inside a sentence;
/// every other `.`, `?` and `!` ends one.
pub fn split_into_sentences(text: &str) -> Vec<String> {
    let rules = &*SENTENCE_RULES;
    let apply = |t: String, i: usize| rules[i].0.replace_all(&t, rules[i].1).into_owned();
    let mut t = format!(" {text}  ").replace('\n', " ");
    for i in 0..3 {
        t = apply(t, i);
    }
    static DOTS: LazyLock<Regex> = LazyLock::new(|| re(r"\.{2,}"));
    t = DOTS.replace_all(&t, |c: &Captures| format!("{}<stop>", "<prd>".repeat(c[0].len()))).into_owned();
    t = t.replace("Ph.D.", "Ph<prd>D<prd>");
    for i in 3..rules.len() {
        t = apply(t, i);
    }
    for (from, to) in [(".”", "”."), (".\"", "\"."), ("!\"", "\"!"), ("?\"", "\"?")] {
        t = t.replace(from, to);
    }
    let t = t.replace('.', ".<stop>").replace('?', "?<stop>").replace('!', "!<stop>").replace("<prd>", ".");
    let mut sentences: Vec<String> = t.split("<stop>").map(|s| s.trim().to_string()).collect();
    if sentences.last().is_some_and(String::is_empty) {
        sentences.pop();
    }
    sentences
}

/// The number of words as NLTK's `RegexpTokenizer(r"\w+")` counts them (Python's `\w`:
/// letters, numbers and `_`).
pub fn count_words(text: &str) -> usize {
    static WORD: LazyLock<Regex> = LazyLock::new(|| re(r"[\p{L}\p{N}_]+"));
    WORD.find_iter(text).count()
}

/// Word tokens in the manner of NLTK's `word_tokenize`: punctuation is split off, hyphens,
/// apostrophes, slashes and inner periods stay inside a word, and the Treebank contractions
/// (`n't`, `'s`, `'re`, `'ve`, `'ll`, `'d`, `'m`) are tokens of their own. An approximation:
/// NLTK's rarer rules (`cannot` → `can not`, quotes, ...) are not reproduced.
pub fn word_tokens(text: &str) -> Vec<&str> {
    const CONTRACTIONS: [&str; 7] = ["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];
    let joins = |c: char| c.is_alphanumeric() || "-'’./_".contains(c);
    let mut out = Vec::new();
    for chunk in text.split(|c: char| !joins(c)) {
        let word = chunk.trim_matches(|c: char| !c.is_alphanumeric());
        if word.is_empty() {
            continue;
        }
        let lower = word.to_lowercase();
        match CONTRACTIONS.iter().find(|c| lower.ends_with(*c) && lower.len() > c.len()) {
            // Contractions are ASCII, so the split falls on a character boundary.
            Some(c) => out.extend([&word[..word.len() - c.len()], &word[word.len() - c.len()..]]),
            None => out.push(word),
        }
    }
    out
}

/// Python's `str.isupper()`: some cased character, and none lowercase or titlecase.
pub fn is_upper(text: &str) -> bool {
    all_cased_chars(text, char::is_uppercase)
}

/// Python's `str.islower()`: some cased character, and none uppercase or titlecase.
pub fn is_lower(text: &str) -> bool {
    all_cased_chars(text, char::is_lowercase)
}

fn all_cased_chars(text: &str, case: fn(char) -> bool) -> bool {
    let mut cased = false;
    for c in text.chars() {
        // Titlecase letters (`ǅ`) are neither upper- nor lowercase but still change case.
        let is_cased = c.is_uppercase() || c.is_lowercase() || c.to_lowercase().ne(std::iter::once(c));
        if is_cased && !case(c) {
            return false;
        }
        cased |= is_cased;
    }
    cased
}

/// The language of `text` as an ISO 639-1 code (langdetect's codes, so Chinese is `zh-cn`),
/// or `None` when no language can be told (IFEval counts that as followed).
///
/// Detected with `whatlang`, not IFEval's `langdetect`: the two may disagree on short or
/// mixed-language texts, and whatlang knows no Swahili (`sw`), so a Swahili answer fails.
pub fn detect_language(text: &str) -> Option<&'static str> {
    whatlang::detect_lang(text).map(iso_639_1)
}

fn iso_639_1(lang: whatlang::Lang) -> &'static str {
    use whatlang::Lang::*;
    match lang {
        Epo => "eo",
        Eng => "en",
        Rus => "ru",
        Cmn => "zh-cn",
        Spa => "es",
        Por => "pt",
        Ita => "it",
        Ben => "bn",
        Fra => "fr",
        Deu => "de",
        Ukr => "uk",
        Kat => "ka",
        Ara => "ar",
        Hin => "hi",
        Jpn => "ja",
        Heb => "he",
        Yid => "yi",
        Pol => "pl",
        Amh => "am",
        Jav => "jv",
        Kor => "ko",
        Nob => "no",
        Dan => "da",
        Swe => "sv",
        Fin => "fi",
        Tur => "tr",
        Nld => "nl",
        Hun => "hu",
        Ces => "cs",
        Ell => "el",
        Bul => "bg",
        Bel => "be",
        Mar => "mr",
        Kan => "kn",
        Ron => "ro",
        Slv => "sl",
        Hrv => "hr",
        Srp => "sr",
        Mkd => "mk",
        Lit => "lt",
        Lav => "lv",
        Est => "et",
        Tam => "ta",
        Vie => "vi",
        Urd => "ur",
        Tha => "th",
        Guj => "gu",
        Uzb => "uz",
        Pan => "pa",
        Aze => "az",
        Ind => "id",
        Tel => "te",
        Pes => "fa",
        Mal => "ml",
        Ori => "or",
        Mya => "my",
        Nep => "ne",
        Sin => "si",
        Khm => "km",
        Tuk => "tk",
        Aka => "ak",
        Zul => "zu",
        Sna => "sn",
        Afr => "af",
        Lat => "la",
        Slk => "sk",
        Cat => "ca",
        Tgl => "tl",
        Hye => "hy",
        Cym => "cy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_keep_abbreviations_decimals_and_ellipses_together() {
        assert_eq!(split_into_sentences("Hello there. How are you? Fine!"), ["Hello there.", "How are you?", "Fine!"]);
        // Titles, decimals, websites, initials.
        assert_eq!(
            split_into_sentences("Mr. Smith paid 3.50 at shop.com today."),
            ["Mr. Smith paid 3.50 at shop.com today."]
        );
        assert_eq!(split_into_sentences("I met J. R. R. Tolkien. He wrote."), ["I met J. R. R. Tolkien.", "He wrote."]);
        assert_eq!(
            split_into_sentences("The U.S.A. is big. Wait... what?"),
            ["The U.S.A. is big.", "Wait...", "what?"]
        );
        // A stop inside quotes ends the sentence after the quote.
        assert_eq!(split_into_sentences("He said \"go.\" Then left."), ["He said \"go\".", "Then left."]);
        // Every `!` counts, even doubled (as in the original).
        assert_eq!(split_into_sentences("Wow!! Yes"), ["Wow!", "!", "Yes"]);
        assert!(split_into_sentences("   ").is_empty());
    }

    #[test]
    fn words_and_tokens() {
        assert_eq!(count_words("It's a well-known fact: 3.5 cats_x!"), 9);
        assert_eq!(count_words("Привет, мир"), 2);
        assert_eq!(
            word_tokens("DON'T stop, (NOW) U.S. state-of-the-art."),
            ["DO", "N'T", "stop", "NOW", "U.S", "state-of-the-art"]
        );
        assert_eq!(word_tokens("**BOLD** it's"), ["BOLD", "it", "'s"]);
    }

    #[test]
    fn case_like_python() {
        assert!(is_upper("HELLO, WORLD 42") && !is_upper("Hello") && !is_upper("123"));
        assert!(is_lower("hello, world 42") && !is_lower("hello World") && !is_lower("..."));
        // Titlecase `ǅ` is neither.
        assert!(!is_upper("ǅA") && !is_lower("ǅa"));
    }

    #[test]
    fn languages_as_iso_639_1() {
        assert_eq!(detect_language("The quick brown fox jumps over the lazy dog near the river bank."), Some("en"));
        assert_eq!(detect_language("Der schnelle braune Fuchs springt über den faulen Hund am Fluss."), Some("de"));
        assert_eq!(detect_language("Быстрая коричневая лиса прыгает через ленивую собаку."), Some("ru"));
        assert_eq!(detect_language("12345 !!! ..."), None);
    }
}
