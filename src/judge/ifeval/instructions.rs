//! IFEval's 25 instruction types: each parsed from its id and `kwargs`, and checked against a
//! response with the semantics of the official `instructions.py`.

use std::sync::LazyLock;

use anyhow::{anyhow, bail, Result};
use regex::Regex;
use serde_json::{Map, Value};

use super::text;

/// Every instruction id IFEval defines.
pub const INSTRUCTION_IDS: &[&str] = &[
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "startend:quotation",
];

/// How a count compares with its threshold (IFEval's `relation` arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// `less than`: count < threshold.
    LessThan,
    /// `at least`: count >= threshold.
    AtLeast,
}

impl Relation {
    fn holds(self, count: usize, threshold: usize) -> bool {
        match self {
            Relation::LessThan => count < threshold,
            Relation::AtLeast => count >= threshold,
        }
    }
}

/// One IFEval instruction with its arguments.
#[derive(Debug, Clone)]
pub enum Instruction {
    /// `keywords:existence`: every keyword (a pattern, case-insensitive) occurs.
    Keywords(Vec<Regex>),
    /// `keywords:frequency`: occurrences of the keyword (case-insensitive).
    KeywordFrequency(Regex, Relation, usize),
    /// `keywords:forbidden_words`: no word occurs as a whole word (case-insensitive).
    ForbiddenWords(Vec<Regex>),
    /// `keywords:letter_frequency`: occurrences of the (lower-cased) letter.
    LetterFrequency(char, Relation, usize),
    /// `language:response_language`: the detected language (ISO 639-1).
    Language(String),
    /// `length_constraints:number_sentences`.
    Sentences(Relation, usize),
    /// `length_constraints:number_paragraphs`: exactly this many `***`-separated paragraphs.
    Paragraphs(usize),
    /// `length_constraints:number_words`.
    Words(Relation, usize),
    /// `length_constraints:nth_paragraph_first_word`: paragraph count, n (from 1), first word.
    NthParagraphFirstWord(usize, usize, String),
    /// `detectable_content:number_placeholders`: at least this many `[...]`.
    Placeholders(usize),
    /// `detectable_content:postscript`: a line of the lower-cased response matches.
    Postscript(Regex),
    /// `detectable_format:number_bullet_lists`: exactly this many `*` or `-` bullets.
    Bullets(usize),
    /// `detectable_format:constrained_response`: one of "My answer is yes/no/maybe.".
    ConstrainedResponse,
    /// `detectable_format:number_highlighted_sections`: at least this many `*...*`.
    Highlights(usize),
    /// `detectable_format:multiple_sections`: at least this many splitter matches.
    Sections(Regex, usize),
    /// `detectable_format:json_format`: JSON, optionally in a code fence.
    Json,
    /// `detectable_format:title`: a non-blank `<<title>>`.
    Title,
    /// `combination:two_responses`: two different answers separated by `******`.
    TwoResponses,
    /// `combination:repeat_prompt`: starts with the prompt (case-insensitive).
    RepeatPrompt(String),
    /// `startend:end_checker`: ends with the phrase (case-insensitive, outer `"` ignored).
    EndsWith(String),
    /// `change_case:capital_word_frequency`: words in capitals.
    CapitalWords(Relation, usize),
    /// `change_case:english_capital`: all capitals, in English.
    EnglishCapital,
    /// `change_case:english_lowercase`: all lowercase, in English.
    EnglishLowercase,
    /// `punctuation:no_comma`.
    NoComma,
    /// `startend:quotation`: wrapped in double quotes.
    Quotation,
}

/// The `kwargs` of one instruction, read with errors that name it and the argument.
struct Args<'a> {
    id: &'a str,
    kwargs: &'a Map<String, Value>,
}

impl Args<'_> {
    fn fail(&self, name: &str, what: &str) -> anyhow::Error {
        anyhow!("instruction `{}`: argument `{name}`: {what}", self.id)
    }

    /// A present argument; `null` counts as absent, as in IFEval's data.
    fn get(&self, name: &str) -> Result<&Value> {
        self.kwargs.get(name).filter(|v| !v.is_null()).ok_or_else(|| self.fail(name, "missing"))
    }

    /// A whole number; `4.0` counts too (data sets exported through float columns write it).
    fn count(&self, name: &str) -> Result<usize> {
        let v = self.get(name)?;
        let whole = v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64);
        v.as_u64()
            .or(whole.map(|f| f as u64))
            .map(|n| n as usize)
            .ok_or_else(|| self.fail(name, &format!("expected a whole number >= 0, got {v}")))
    }

    fn text(&self, name: &str) -> Result<&str> {
        let v = self.get(name)?;
        v.as_str().ok_or_else(|| self.fail(name, &format!("expected a string, got {v}")))
    }

    fn texts(&self, name: &str) -> Result<Vec<&str>> {
        let v = self.get(name)?;
        let items = v.as_array().ok_or_else(|| self.fail(name, &format!("expected a list of strings, got {v}")))?;
        if items.is_empty() {
            return Err(self.fail(name, "empty"));
        }
        items.iter().map(|s| s.as_str().ok_or_else(|| self.fail(name, &format!("expected strings, got {s}")))).collect()
    }

    fn relation(&self, name: &str) -> Result<Relation> {
        match self.text(name)? {
            "less than" => Ok(Relation::LessThan),
            "at least" => Ok(Relation::AtLeast),
            other => Err(self.fail(name, &format!("expected `less than` or `at least`, got `{other}`"))),
        }
    }

    /// `pattern`, built from argument `name`, compiled (IFEval uses its arguments as regexes).
    fn pattern(&self, name: &str, pattern: &str) -> Result<Regex> {
        Regex::new(pattern).map_err(|e| self.fail(name, &format!("not a valid pattern: {e}")))
    }

    /// A pattern for each string of list argument `name`, built by `wrap`.
    fn patterns(&self, name: &str, wrap: impl Fn(&str) -> String) -> Result<Vec<Regex>> {
        self.texts(name)?.iter().map(|w| self.pattern(name, &wrap(w))).collect()
    }
}

impl Instruction {
    /// The instruction `id` with its `kwargs`; an error names an unknown id, or the instruction
    /// and the argument that is missing or of the wrong type.
    pub fn parse(id: &str, kwargs: &Map<String, Value>) -> Result<Self> {
        use Instruction::*;
        let a = Args { id, kwargs };
        Ok(match id {
            "keywords:existence" => Keywords(a.patterns("keywords", |k| format!("(?i){k}"))?),
            "keywords:frequency" => {
                let keyword = a.text("keyword")?.trim();
                KeywordFrequency(
                    a.pattern("keyword", &format!("(?i){keyword}"))?,
                    a.relation("relation")?,
                    a.count("frequency")?,
                )
            }
            "keywords:forbidden_words" => ForbiddenWords(a.patterns("forbidden_words", |w| format!(r"(?i)\b{w}\b"))?),
            "keywords:letter_frequency" => {
                let letter = match a.text("letter")?.chars().collect::<Vec<_>>()[..] {
                    [c] if c.is_ascii_alphabetic() => c.to_ascii_lowercase(),
                    _ => bail!(a.fail("letter", "expected one letter a-z")),
                };
                LetterFrequency(letter, a.relation("let_relation")?, a.count("let_frequency")?)
            }
            "language:response_language" => Language(a.text("language")?.to_string()),
            "length_constraints:number_sentences" => Sentences(a.relation("relation")?, a.count("num_sentences")?),
            "length_constraints:number_paragraphs" => Paragraphs(a.count("num_paragraphs")?),
            "length_constraints:number_words" => Words(a.relation("relation")?, a.count("num_words")?),
            "length_constraints:nth_paragraph_first_word" => {
                let (count, nth) = (a.count("num_paragraphs")?, a.count("nth_paragraph")?);
                if nth == 0 || nth > count {
                    bail!(a.fail("nth_paragraph", &format!("expected 1 to num_paragraphs ({count}), got {nth}")));
                }
                NthParagraphFirstWord(count, nth, a.text("first_word")?.to_lowercase())
            }
            "detectable_content:number_placeholders" => Placeholders(a.count("num_placeholders")?),
            "detectable_content:postscript" => {
                let pattern = match a.text("postscript_marker")?.trim() {
                    "P.P.S" => r"(?m)\s*p\.\s?p\.\s?s.*$".to_string(),
                    "P.S." => r"(?m)\s*p\.\s?s\..*$".to_string(),
                    other => format!(r"(?m)\s*{}.*$", other.to_lowercase()),
                };
                Postscript(a.pattern("postscript_marker", &pattern)?)
            }
            "detectable_format:number_bullet_lists" => Bullets(a.count("num_bullets")?),
            "detectable_format:constrained_response" => ConstrainedResponse,
            "detectable_format:number_highlighted_sections" => Highlights(a.count("num_highlights")?),
            "detectable_format:multiple_sections" => {
                let splitter = a.text("section_spliter")?.trim();
                Sections(a.pattern("section_spliter", &format!(r"\s?{splitter}\s?\d+\s?"))?, a.count("num_sections")?)
            }
            "detectable_format:json_format" => Json,
            "detectable_format:title" => Title,
            "combination:two_responses" => TwoResponses,
            "combination:repeat_prompt" => match a.text("prompt_to_repeat")?.trim() {
                "" => bail!(a.fail("prompt_to_repeat", "empty")),
                prompt => RepeatPrompt(prompt.to_lowercase()),
            },
            "startend:end_checker" => EndsWith(a.text("end_phrase")?.trim().to_lowercase()),
            "change_case:capital_word_frequency" => {
                CapitalWords(a.relation("capital_relation")?, a.count("capital_frequency")?)
            }
            "change_case:english_capital" => EnglishCapital,
            "change_case:english_lowercase" => EnglishLowercase,
            "punctuation:no_comma" => NoComma,
            "startend:quotation" => Quotation,
            other => bail!("unknown instruction `{other}` (known: {})", INSTRUCTION_IDS.join(", ")),
        })
    }

    /// Whether `response` follows the instruction.
    pub fn check(&self, response: &str) -> bool {
        use Instruction::*;
        let p = &*PATTERNS;
        match self {
            Keywords(patterns) => patterns.iter().all(|p| p.is_match(response)),
            KeywordFrequency(keyword, relation, n) => relation.holds(keyword.find_iter(response).count(), *n),
            ForbiddenWords(patterns) => !patterns.iter().any(|p| p.is_match(response)),
            LetterFrequency(letter, relation, n) => {
                relation.holds(response.to_lowercase().chars().filter(|c| c == letter).count(), *n)
            }
            // No language told counts as followed, as IFEval does on langdetect's error.
            Language(code) => text::detect_language(response).is_none_or(|got| got == code),
            Sentences(relation, n) => relation.holds(text::split_into_sentences(response).len(), *n),
            Paragraphs(n) => star_paragraphs(response) == Some(*n),
            Words(relation, n) => relation.holds(text::count_words(response), *n),
            NthParagraphFirstWord(count, nth, word) => nth_paragraph_first_word(response, *count, *nth, word),
            Placeholders(n) => p.placeholder.find_iter(response).count() >= *n,
            Postscript(marker) => marker.is_match(&response.to_lowercase()),
            Bullets(n) => p.star_bullet.find_iter(response).count() + p.dash_bullet.find_iter(response).count() == *n,
            ConstrainedResponse => {
                ["My answer is yes.", "My answer is no.", "My answer is maybe."].iter().any(|o| response.contains(o))
            }
            Highlights(n) => highlights(response) >= *n,
            Sections(splitter, n) => splitter.find_iter(response).count() >= *n,
            Json => is_json(response),
            Title => p
                .title
                .find_iter(response)
                .any(|t| !t.as_str().trim_start_matches('<').trim_end_matches('>').trim().is_empty()),
            TwoResponses => two_responses(response),
            RepeatPrompt(prompt) => response.trim().to_lowercase().starts_with(prompt.as_str()),
            EndsWith(phrase) => response.trim().trim_matches('"').to_lowercase().ends_with(phrase.as_str()),
            CapitalWords(relation, n) => {
                relation.holds(text::word_tokens(response).into_iter().filter(|w| text::is_upper(w)).count(), *n)
            }
            EnglishCapital => text::is_upper(response) && is_english(response),
            EnglishLowercase => text::is_lower(response) && is_english(response),
            NoComma => !response.contains(','),
            Quotation => {
                let t = response.trim();
                t.chars().count() > 1 && t.starts_with('"') && t.ends_with('"')
            }
        }
    }
}

/// English, or no language told (which IFEval counts as followed).
fn is_english(response: &str) -> bool {
    text::detect_language(response).is_none_or(|l| l == "en")
}

/// IFEval's fixed patterns, compiled once.
struct Patterns {
    placeholder: Regex,
    star_bullet: Regex,
    dash_bullet: Regex,
    title: Regex,
    highlight: Regex,
    double_highlight: Regex,
    divider: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    placeholder: text::re(r"\[.*?\]"),
    star_bullet: text::re(r"(?m)^\s*\*[^\*].*$"),
    dash_bullet: text::re(r"(?m)^\s*-.*$"),
    title: text::re(r"<<[^\n]+>>"),
    highlight: text::re(r"\*[^\n\*]*\*"),
    double_highlight: text::re(r"\*\*[^\n\*]*\*\*"),
    divider: text::re(r"\s?\*\*\*\s?"),
});

/// Paragraphs split by `***`; blank ones are allowed only first or last (not counted), and
/// any other blank one makes the response fail (`None`).
fn star_paragraphs(response: &str) -> Option<usize> {
    let parts: Vec<&str> = PATTERNS.divider.split(response).collect();
    let last = parts.len() - 1;
    let mut count = parts.len();
    for (i, p) in parts.iter().enumerate() {
        if p.trim().is_empty() {
            if i != 0 && i != last {
                return None;
            }
            count -= 1;
        }
    }
    Some(count)
}

fn nth_paragraph_first_word(response: &str, count: usize, nth: usize, word: &str) -> bool {
    let paragraphs: Vec<&str> = response.split("\n\n").collect();
    let found = paragraphs.iter().filter(|p| !p.trim().is_empty()).count();
    // The n-th of all parts, blank ones included, as the original indexes them.
    let paragraph = match paragraphs.get(nth - 1) {
        Some(p) if nth <= found && !p.trim().is_empty() => p.trim(),
        _ => return false,
    };
    let first = paragraph.split_whitespace().next().unwrap_or("").trim_start_matches('\'').trim_start_matches('"');
    let first: String = first.chars().take_while(|c| !".,?!'\"".contains(*c)).collect::<String>().to_lowercase();
    found == count && first == word
}

/// `*single*` and `**double**` highlights with some non-blank text inside.
fn highlights(response: &str) -> usize {
    let (single, double) = (&PATTERNS.highlight, &PATTERNS.double_highlight);
    let single = single.find_iter(response).filter(|h| !h.as_str().trim_matches('*').trim().is_empty());
    // A double match is `**...**`: ASCII stars, so slicing them off keeps char boundaries.
    let double = double.find_iter(response).filter(|h| !h.as_str()[2..h.len() - 2].trim().is_empty());
    single.count() + double.count()
}

/// JSON once whitespace and a Markdown code fence (```` ```json ````, ```` ```Json ````,
/// ```` ```JSON ```` or ```` ``` ````) are stripped.
fn is_json(response: &str) -> bool {
    let mut t = response.trim();
    for prefix in ["```json", "```Json", "```JSON", "```"] {
        t = t.strip_prefix(prefix).unwrap_or(t);
    }
    let t = t.strip_suffix("```").unwrap_or(t).trim();
    serde_json::from_str::<Value>(t).is_ok()
}

/// Two different non-blank answers separated by `******` (blank parts only at either end).
fn two_responses(response: &str) -> bool {
    let parts: Vec<&str> = response.split("******").collect();
    let mut answers = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if !p.trim().is_empty() {
            answers.push(p.trim());
        } else if i != 0 && i != parts.len() - 1 {
            return false;
        }
    }
    answers.len() == 2 && answers[0] != answers[1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whether `response` follows instruction `id` with `kwargs` (strict, as checked here).
    fn follows(id: &str, kwargs: Value, response: &str) -> bool {
        Instruction::parse(id, kwargs.as_object().unwrap()).unwrap().check(response)
    }

    /// Each case: (id, kwargs, a response that follows it, one that does not).
    fn assert_cases(cases: &[(&str, Value, &str, &str)]) {
        for (id, kwargs, pass, fail) in cases {
            assert!(follows(id, kwargs.clone(), pass), "{id} {kwargs} should pass {pass:?}");
            assert!(!follows(id, kwargs.clone(), fail), "{id} {kwargs} should fail {fail:?}");
        }
    }

    #[test]
    fn keywords() {
        assert_cases(&[
            (
                "keywords:existence",
                json!({"keywords": ["river", "Moon"]}),
                "The moon over the River.",
                "The moon only.",
            ),
            // A substring counts (`re.findall`), in any case.
            (
                "keywords:frequency",
                json!({"keyword": "cat", "frequency": 3, "relation": "at least"}),
                "Cat, cat, concatenate",
                "cat cat",
            ),
            (
                "keywords:frequency",
                json!({"keyword": " cat ", "frequency": 2, "relation": "less than"}),
                "one cat",
                "cat cat",
            ),
            // Whole words only.
            (
                "keywords:forbidden_words",
                json!({"forbidden_words": ["cat", "dog"]}),
                "concatenate hotdogs",
                "A Cat sat",
            ),
            (
                "keywords:letter_frequency",
                json!({"letter": "Z", "let_frequency": 2, "let_relation": "less than"}),
                "zebra",
                "Zizz",
            ),
            (
                "keywords:letter_frequency",
                json!({"letter": "a", "let_frequency": 3, "let_relation": "at least"}),
                "A banana",
                "an apple",
            ),
        ]);
    }

    #[test]
    fn language_and_case() {
        let german = "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft im Garten.";
        let english = "The quick brown fox jumps over the lazy dog while the cat sleeps in the garden.";
        assert_cases(&[
            ("language:response_language", json!({"language": "de"}), german, english),
            ("change_case:english_capital", json!({}), &english.to_uppercase(), english),
            ("change_case:english_capital", json!({}), &english.to_uppercase(), &german.to_uppercase()),
            ("change_case:english_lowercase", json!({}), &english.to_lowercase(), english),
            ("change_case:english_lowercase", json!({}), &english.to_lowercase(), &german.to_lowercase()),
            // `I`, `DO` and `N'T` are three words in capitals.
            (
                "change_case:capital_word_frequency",
                json!({"capital_frequency": 3, "capital_relation": "at least"}),
                "I DON'T know",
                "I love THIS",
            ),
            (
                "change_case:capital_word_frequency",
                json!({"capital_frequency": 2, "capital_relation": "less than"}),
                "I love this",
                "I love THIS",
            ),
        ]);
        // No language can be told: followed, as IFEval counts langdetect's error.
        assert!(follows("language:response_language", json!({"language": "fr"}), "12345 !!!"));
    }

    #[test]
    fn length_constraints() {
        assert_cases(&[
            (
                "length_constraints:number_sentences",
                json!({"num_sentences": 2, "relation": "less than"}),
                "Dr. Smith paid 3.50 dollars.",
                "One. Two.",
            ),
            (
                "length_constraints:number_sentences",
                json!({"num_sentences": 3, "relation": "at least"}),
                "Ab cd. Ef gh! Ij kl?",
                "Ab cd. Ef gh.",
            ),
            // A one-letter word before a period reads as an initial, as in the original.
            (
                "length_constraints:number_sentences",
                json!({"num_sentences": 2, "relation": "less than"}),
                "A b. C d!",
                "Ab cd. Ef gh!",
            ),
            // Blank paragraphs only at either end; `***` separates.
            (
                "length_constraints:number_paragraphs",
                json!({"num_paragraphs": 2}),
                "***\nFirst.\n***\nSecond.",
                "First.\n***\n\n***\nSecond.",
            ),
            ("length_constraints:number_paragraphs", json!({"num_paragraphs": 2}), "A * B\n*** C", "Only one."),
            // `It's` is two words to `\w+`.
            (
                "length_constraints:number_words",
                json!({"num_words": 5, "relation": "less than"}),
                "It's a b",
                "It's a b c",
            ),
            (
                "length_constraints:number_words",
                json!({"num_words": 3, "relation": "at least"}),
                "well-known fact",
                "two words",
            ),
            (
                "length_constraints:nth_paragraph_first_word",
                json!({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"}),
                "First part.\n\n\"Then, second.\"",
                "First.\n\nNow second.",
            ),
            (
                "length_constraints:nth_paragraph_first_word",
                json!({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}),
                "A.\n\nthen b.\n\n",
                "A.\n\nThen b.\n\nC.",
            ),
            // The n-th part is indexed with blank parts included, as in the original.
            (
                "length_constraints:nth_paragraph_first_word",
                json!({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}),
                "then a.\n\nthen b.",
                "A.\n\n\n\nthen b.",
            ),
        ]);
    }

    #[test]
    fn detectable_content_and_format() {
        assert_cases(&[
            (
                "detectable_content:number_placeholders",
                json!({"num_placeholders": 2}),
                "Dear [name], at [address]",
                "Dear [name], at [add\nress]",
            ),
            ("detectable_content:postscript", json!({"postscript_marker": "P.S."}), "Hi.\np. s. bye", "Hi.\nPS bye"),
            (
                "detectable_content:postscript",
                json!({"postscript_marker": "P.P.S"}),
                "Hi.\nP.P.S. more",
                "Hi.\nP.S. more",
            ),
            ("detectable_content:postscript", json!({"postscript_marker": "Note:"}), "Hi.\nnote: later", "Hi."),
            (
                "detectable_format:number_bullet_lists",
                json!({"num_bullets": 2}),
                "**bold**\n* one\n- two",
                "* one\n* two\n- three",
            ),
            (
                "detectable_format:constrained_response",
                json!({}),
                "  My answer is maybe. Because",
                "My answer is perhaps.",
            ),
            // An empty `**` is no highlight; `**two**` counts once as a double.
            (
                "detectable_format:number_highlighted_sections",
                json!({"num_highlights": 2}),
                "*one* and **two**",
                "*one* and ** **",
            ),
            (
                "detectable_format:multiple_sections",
                json!({"section_spliter": "Section", "num_sections": 2}),
                "Section 1\nA\nSection 2\nB",
                "Section 1\nA\nsection 2\nB",
            ),
            ("detectable_format:json_format", json!({}), "```JSON\n{\"a\": [1, 2]}\n```", "{a: 1}"),
            ("detectable_format:json_format", json!({"unused": null}), " [1, 2] ", "```json\n{\"a\": 1,}\n```"),
            ("detectable_format:title", json!({}), "<<My Poem>>\nroses", "<<  >> and <<a\nb>>"),
        ]);
    }

    #[test]
    fn combination_startend_and_punctuation() {
        assert_cases(&[
            ("combination:two_responses", json!({}), "Answer A\n******\nAnswer B", "Same\n******\nSame "),
            ("combination:two_responses", json!({}), "******A******B******", "A\n******\n\n******\nB"),
            (
                "combination:repeat_prompt",
                json!({"prompt_to_repeat": "Write a poem. "}),
                " write a POEM. Roses.",
                "Sure! Write a poem.",
            ),
            (
                "startend:end_checker",
                json!({"end_phrase": "Any other questions?"}),
                "Text. Any other QUESTIONS?\"  ",
                "Any other questions? Thanks.",
            ),
            ("punctuation:no_comma", json!({}), "No commas here.", "Yes, one."),
            ("startend:quotation", json!({}), "  \"Hello\"  ", "\"Hello"),
            ("startend:quotation", json!({}), "\"\"", "\""),
        ]);
    }

    #[test]
    fn bad_instructions_are_named() {
        let err =
            |id: &str, kwargs: Value| Instruction::parse(id, kwargs.as_object().unwrap()).unwrap_err().to_string();
        let e = err("keywords:sparkle", json!({}));
        assert!(e.contains("unknown instruction `keywords:sparkle`") && e.contains("known: keywords:existence"), "{e}");
        let e = err("keywords:frequency", json!({"keyword": "a", "frequency": null, "relation": "at least"}));
        assert_eq!(e, "instruction `keywords:frequency`: argument `frequency`: missing");
        let e = err("length_constraints:number_words", json!({"num_words": "ten", "relation": "at least"}));
        assert!(e.contains("`length_constraints:number_words`: argument `num_words`: expected a whole number"), "{e}");
        let e = err("length_constraints:number_words", json!({"num_words": 10, "relation": "at most"}));
        assert!(e.contains("argument `relation`: expected `less than` or `at least`"), "{e}");
        let e = err("keywords:existence", json!({"keywords": "river"}));
        assert!(e.contains("argument `keywords`: expected a list of strings"), "{e}");
        let e =
            err("keywords:letter_frequency", json!({"letter": "ab", "let_frequency": 1, "let_relation": "at least"}));
        assert!(e.contains("argument `letter`: expected one letter"), "{e}");
        let e = err(
            "length_constraints:nth_paragraph_first_word",
            json!({"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}),
        );
        assert!(e.contains("argument `nth_paragraph`"), "{e}");
        let e = err("keywords:existence", json!({"keywords": ["(unclosed"]}));
        assert!(e.contains("argument `keywords`: not a valid pattern"), "{e}");
    }
}
