#!/usr/bin/env python3
"""Generate candor's shipped datasets (deterministic; standard library only).

Run from the repository root:  python3 data/make_datasets.py [OUT_DIR]
Writes data/sft/{train,test}.jsonl and data/preference/{train,test}.jsonl (or under OUT_DIR).

Every row is a conversational TRL row (lists of {role, content}) with a `task` and what a
program needs to verify any completion: a numeric `answer` (arithmetic, unit conversion, GSM8K's
`#### N` style) or IFEval's `instruction_id_list` + `kwargs` (instruction following, one or two
instructions per prompt). Every task family has many phrasings ("templates"); train and test are
disjoint by template as well as by prompt, so the test split holds phrasings never trained on.
The chosen/SFT answer satisfies every check, the rejected one breaks at least one.
"""
import json
import math
import os
import random
import re

SEED = 20261201
HERE = os.path.dirname(os.path.abspath(__file__))
TEST_SHARE = 0.25  # of each family's templates, held out for the test split

TOPICS = ["the sea", "a forest", "the moon", "coffee", "a library", "winter", "bicycles", "rain", "a market",
          "mountains", "the desert", "music", "a garden", "trains", "the city at night", "bees", "a lighthouse",
          "autumn leaves", "a bakery", "the river", "snow", "a museum", "old maps", "thunderstorms", "tea",
          "a small village", "the night sky", "a harbor", "wild horses", "a quiet beach"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo",
         "Noor", "Omar", "Priya"]
KEYWORDS = ["bright", "quiet", "ancient", "gentle", "busy", "cold", "green", "small", "golden", "calm", "wide",
            "soft"]
FORBIDDEN = ["beautiful", "nice", "very", "amazing", "good", "great"]
END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all.", "Hope this helps."]
UNITS = [("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("meters", "centimeters", 100), ("minutes", "seconds", 60), ("liters", "milliliters", 1000),
         ("feet", "inches", 12), ("yards", "feet", 3), ("days", "hours", 24), ("weeks", "days", 7),
         ("dozens", "items", 12), ("centimeters", "millimeters", 10)]

# Sentences about a topic, none with a comma, in plain lowercase-able English.
SENTENCES = ["{T} has a calm and steady rhythm.", "People often stop to look at {t}.",
             "In the morning {t} feels fresh and new.", "Many stories begin with {t}.",
             "Children like to draw {t} in bright colors.", "{T} changes a little every day.",
             "Some people visit {t} to rest their minds.", "The light around {t} is soft in the evening.",
             "Writers have described {t} for centuries.", "There is always something new to notice about {t}."]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def near_miss(error):
    """Partial credit of a wrong number: 0.5 * exp(-|error| / 2) (off by one: 0.30)."""
    return round(0.5 * math.exp(-abs(error) / 2), 4)


def sentences(rng, topic, n):
    picks = rng.sample(SENTENCES, n)
    return [s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in picks]


# ---------------------------------------------------------------------------------------------
# Arithmetic: bare expressions and word problems; answers are numbers (some GSM8K-style).

EXPR_TEMPLATES = [
    "What is {e}? Answer with just the number.", "Compute {e}. Reply with the number only.",
    "Calculate {e} and give only the result.", "{e} = ? Respond with a single number.",
    "Work out {e}. Write only the final number.", "Evaluate the expression {e}. Output just the value.",
    "I need the value of {e}. Just the number, please.", "Quick math: {e}. Number only.",
    "Solve {e} and respond with nothing but the answer.", "What do you get when you compute {e}? Only the number.",
    "Tell me the result of {e} as a bare number.", "Find {e}. Give the answer as a number with no words.",
    "Please evaluate {e}. Reply with digits only.", "How much is {e}? Answer with one number.",
    "Give me {e}, just the number.", "Determine the value of {e}. Only output the number.",
]
WORD_PROBLEMS = [
    ("{n} has {a} apples and buys {b} more. How many apples does {n} have now?", "+"),
    ("A shelf holds {a} books. {n} takes {b} of them away. How many books are left on the shelf?", "-"),
    ("{n} packs {a} boxes with {b} pens in each box. How many pens is that in total?", "*"),
    ("A train carries {a} passengers and {b} more get on at the next stop. How many passengers are on board?", "+"),
    ("{n} had {a} coins and spent {b}. How many coins remain?", "-"),
    ("There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?", "*"),
    ("{n} walked {a} steps before lunch and {b} steps after. How many steps in all?", "+"),
    ("A baker made {a} rolls and sold {b}. How many rolls are left?", "-"),
]
WORD_SUFFIXES = ["Answer with the number only.", "End your answer with '#### ' followed by the number.",
                 "Give just the final number.", "Reply with only the number."]


def expression(rng):
    if rng.random() < 0.5:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        return f"{a} {op} {b}", eval(f"{a} {op} {b}")
    a, b, c = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 12)
    op1, op2 = rng.choice(["+", "-"]), "*"
    return f"{a} {op1} {b} {op2} {c}", eval(f"{a} {op1} {b} {op2} {c}")


def arithmetic_expr(rng, template):
    text, value = expression(rng)
    wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
    return dict(task="arithmetic", prompt=template.format(e=text), good=str(value), bad=str(wrong),
                answer=str(value), bad_reward=near_miss(wrong - value))


def word_problem(rng, template):
    (story, op), suffix = template
    a, b = rng.randint(12, 90), rng.randint(2, 11)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = value + rng.choice([-2, -1, 1, 2])
    prompt = story.format(n=rng.choice(NAMES), a=a, b=b) + " " + suffix
    gsm = "####" in suffix
    good, bad = (f"#### {value}", f"#### {wrong}") if gsm else (str(value), str(wrong))
    answer = f"#### {value}" if gsm else str(value)
    return dict(task="arithmetic", prompt=prompt, good=good, bad=bad, answer=answer, bad_reward=near_miss(wrong - value))


# ---------------------------------------------------------------------------------------------
# Unit conversion.

CONVERSION_TEMPLATES = [
    "Convert {n} {src} to {dst}. Answer with just the number.", "How many {dst} are in {n} {src}? Number only.",
    "{n} {src} is how many {dst}? Reply with the number.", "Express {n} {src} in {dst}. Give only the number.",
    "What is {n} {src} in {dst}? Just the number, please.", "Change {n} {src} into {dst} and write only the result.",
    "I have {n} {src}. How many {dst} is that? Answer with one number.",
    "Turn {n} {src} into {dst}. Output nothing but the number.",
    "Please convert {n} {src} into {dst}. Digits only.", "{n} {src} equals how many {dst}? Only the number.",
    "Give the number of {dst} in {n} {src}.", "Rewrite {n} {src} as {dst}. Reply with the number alone.",
    "If something measures {n} {src}, how many {dst} is it? Number only.",
    "Tell me how many {dst} make up {n} {src}. Just the number.",
    "Work out {n} {src} in {dst}. Write only the final number.",
    "Quick conversion: {n} {src} to {dst}. Number only.", "Find how many {dst} there are in {n} {src}.",
    "Convert this amount to {dst}: {n} {src}. Answer with the number only.",
    "What number of {dst} corresponds to {n} {src}?", "State {n} {src} in {dst} as a bare number.",
]


def conversion(rng, template):
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    value = n * factor
    wrong = n * factor // 10 if factor >= 100 else n + factor
    return dict(task="unit_conversion", prompt=template.format(n=n, src=src, dst=dst), good=str(value), bad=str(wrong),
                answer=str(value), bad_reward=near_miss(wrong - value))


# ---------------------------------------------------------------------------------------------
# Instruction following with IFEval's instruction types. A prompt is a request about a topic
# (one of many phrasings) plus one or two instructions (each with several phrasings), in either
# order. Each instruction: (id, phrasings, kwargs maker, transform that makes a text comply).

REQUESTS = [
    "Write a short note about {t}.", "Describe {t}.", "Tell me about {t}.", "Write a few sentences about {t}.",
    "Share some thoughts on {t}.", "Give a brief description of {t}.", "Say something interesting about {t}.",
    "Write a short paragraph on {t}.", "What comes to mind when you think of {t}?",
    "Explain what makes {t} special.", "Write a little piece about {t}.", "Paint a picture of {t} in words.",
    "Compose a short text about {t}.", "Talk about {t} for a moment.", "Offer a description of {t}.",
    "Write about {t}.", "Give me a few lines on {t}.", "Put into words how {t} feels.",
    "Write a short reflection on {t}.", "Describe {t} to someone who has never seen it.",
    "Let me hear your view of {t}.", "Write some words about {t}.", "Sketch {t} in a few sentences.",
    "Produce a brief text about {t}.",
]


def kw_none(rng):
    return {}


INSTRUCTIONS = {
    "change_case:english_capital": (
        ["Your entire response should be in English, and in all capital letters.",
         "Write everything in capital letters.", "Use only uppercase letters in your answer.",
         "Answer in English using capital letters only.", "Respond entirely in CAPITAL LETTERS."],
        kw_none, lambda text, kw, rng: text.upper()),
    "change_case:english_lowercase": (
        ["Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
         "Write everything in lowercase letters.", "Do not use any capital letters at all.",
         "Answer in English using lowercase letters only.", "Keep every letter of your reply lowercase."],
        kw_none, lambda text, kw, rng: text.lower()),
    "punctuation:no_comma": (
        ["In your entire response, refrain from the use of any commas.", "Do not use any commas.",
         "Avoid commas completely.", "Your answer must not contain a single comma.",
         "Write without using commas."],
        kw_none, lambda text, kw, rng: text.replace(",", "")),
    "length_constraints:number_words": (
        ["Answer with less than {num_words} words.", "Use fewer than {num_words} words.",
         "Keep it under {num_words} words.", "Your response should contain less than {num_words} words.",
         "Stay below {num_words} words."],
        lambda rng: {"relation": "less than", "num_words": rng.randint(12, 25)},
        lambda text, kw, rng: text),
    "length_constraints:number_sentences": (
        ["Your response should contain less than {num_sentences} sentences.",
         "Use fewer than {num_sentences} sentences.", "Write less than {num_sentences} sentences.",
         "Keep it to under {num_sentences} sentences.", "Answer in fewer than {num_sentences} sentences."],
        lambda rng: {"relation": "less than", "num_sentences": rng.randint(3, 5)},
        lambda text, kw, rng: text),
    "length_constraints:number_paragraphs": (
        ["There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***",
         "Write exactly {num_paragraphs} paragraphs separated by ***.",
         "Use {num_paragraphs} paragraphs and put *** between them.",
         "Split your answer into {num_paragraphs} paragraphs, separated by the divider ***.",
         "Give {num_paragraphs} paragraphs with *** on its own between each."],
        lambda rng: {"num_paragraphs": 2},
        lambda text, kw, rng: paragraphs(text, kw["num_paragraphs"])),
    "keywords:existence": (
        ["Include the keywords {keywords} in the response.", "Make sure to use the words {keywords}.",
         "Your answer must mention {keywords}.", "Work the words {keywords} into your answer.",
         "Be sure to include {keywords}."],
        lambda rng: {"keywords": rng.sample(KEYWORDS, 2)},
        lambda text, kw, rng: include_words(text, kw["keywords"])),
    "keywords:forbidden_words": (
        ["Do not include keywords {forbidden_words} in the response.", "Never use the words {forbidden_words}.",
         "Avoid the words {forbidden_words}.", "Your answer must not contain {forbidden_words}.",
         "Do not say {forbidden_words}."],
        lambda rng: {"forbidden_words": rng.sample(FORBIDDEN, 2)},
        lambda text, kw, rng: text),
    "keywords:frequency": (
        ["In your response, the word {keyword} should appear at least {frequency} times.",
         "Use the word {keyword} at least {frequency} times.", "Mention {keyword} {frequency} or more times.",
         "The word {keyword} must appear at least {frequency} times.",
         "Repeat the word {keyword} at least {frequency} times in your reply."],
        lambda rng: {"keyword": rng.choice(KEYWORDS), "frequency": 2, "relation": "at least"},
        lambda text, kw, rng: include_words(text, [kw["keyword"]] * kw["frequency"])),
    "detectable_format:title": (
        ["Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
         "Give your answer a title in double angular brackets, like <<my title>>.",
         "Start with a title wrapped in << and >>.", "Include a title such as <<a title>> at the top.",
         "Put a title in double angle brackets, for example <<the title>>."],
        kw_none, lambda text, kw, rng: f"<<{rng.choice(['a short note', 'notes', 'a small picture', 'thoughts'])}>>\n{text}"),
    "detectable_format:number_bullet_lists": (
        ["Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n* This is point 1.",
         "Answer with exactly {num_bullets} markdown bullet points (* like this).",
         "Use exactly {num_bullets} bullet points, each starting with *.",
         "Format the answer as {num_bullets} bullet points using *.",
         "Give exactly {num_bullets} bullets in markdown."],
        lambda rng: {"num_bullets": rng.randint(2, 4)},
        lambda text, kw, rng: bullets(text, kw["num_bullets"], rng)),
    "detectable_content:postscript": (
        ["At the end of your response, please explicitly add a postscript starting with {postscript_marker}",
         "End with a postscript that starts with {postscript_marker}", "Add a {postscript_marker} note at the end.",
         "Finish with a postscript beginning with {postscript_marker}",
         "Include a postscript starting with {postscript_marker} after your answer."],
        lambda rng: {"postscript_marker": "P.S."},
        lambda text, kw, rng: f"{text}\n\nP.S. {rng.choice(['Thanks for asking.', 'I enjoyed writing this.', 'Have a calm day.'])}"),
    "startend:end_checker": (
        ["Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase.",
         "End your answer with the exact phrase \"{end_phrase}\"", "Your last words must be: {end_phrase}",
         "Close with the phrase {end_phrase} and nothing after it.", "Conclude with exactly: {end_phrase}"],
        lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
        lambda text, kw, rng: f"{text} {kw['end_phrase']}"),
    "startend:quotation": (
        ["Wrap your entire response with double quotation marks.", "Put your whole answer inside double quotes.",
         "Enclose the entire response in double quotation marks.", "Your reply should be wrapped in \" marks.",
         "Surround everything you write with double quotes."],
        kw_none, lambda text, kw, rng: f"\"{text}\""),
    "detectable_format:number_highlighted_sections": (
        ["Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*.",
         "Mark at least {num_highlights} parts with *asterisks* as highlights.",
         "Use markdown to highlight at least {num_highlights} sections, like *this*.",
         "Include at least {num_highlights} highlighted sections wrapped in single asterisks.",
         "Emphasize at least {num_highlights} phrases with *markdown highlights*."],
        lambda rng: {"num_highlights": rng.randint(1, 2)},
        lambda text, kw, rng: highlights(text, kw["num_highlights"])),
    "detectable_content:number_placeholders": (
        ["The response must contain at least {num_placeholders} placeholders represented by square brackets, such as [address].",
         "Include at least {num_placeholders} placeholders in square brackets like [name].",
         "Leave at least {num_placeholders} blanks written as [placeholder].",
         "Use at least {num_placeholders} bracketed placeholders such as [date].",
         "Put at least {num_placeholders} placeholders in [square brackets] in your answer."],
        lambda rng: {"num_placeholders": rng.randint(1, 2)},
        lambda text, kw, rng: f"{text} Meet me at [place] on [date]."),
    "combination:repeat_prompt": (
        ["First repeat the request word for word without change, then give your answer (do not say anything before repeating the request).",
         "Begin by repeating the request exactly, then answer it.", "Restate the request word for word first, then respond.",
         "Start your reply with the request itself, copied exactly, and then answer.",
         "Copy the request verbatim at the start, then give your answer."],
        lambda rng: {},  # `prompt_to_repeat` is filled with the request
        lambda text, kw, rng: f"{kw['prompt_to_repeat']} {text}"),
}

# Pairs that can both hold (IFEval's conflicts left out: case vs case, quotation vs anything that
# must start or end the text, JSON, paragraphs vs bullets, ...).
COMBINABLE = [
    ("change_case:english_lowercase", "punctuation:no_comma"), ("change_case:english_capital", "punctuation:no_comma"),
    ("keywords:existence", "punctuation:no_comma"), ("keywords:existence", "length_constraints:number_words"),
    ("keywords:forbidden_words", "detectable_format:title"), ("keywords:frequency", "startend:end_checker"),
    ("detectable_format:title", "detectable_format:number_bullet_lists"),
    ("detectable_format:title", "detectable_content:postscript"),
    ("length_constraints:number_sentences", "punctuation:no_comma"),
    ("change_case:english_lowercase", "detectable_format:number_highlighted_sections"),
    ("keywords:existence", "detectable_content:postscript"), ("startend:quotation", "punctuation:no_comma"),
    ("detectable_content:number_placeholders", "keywords:forbidden_words"),
    ("combination:repeat_prompt", "punctuation:no_comma"),
    ("length_constraints:number_paragraphs", "keywords:existence"),
]
# Where a second instruction's transform goes relative to the first (case last, quotes outermost).
ORDER = ["combination:repeat_prompt", "keywords:existence", "keywords:frequency", "detectable_content:number_placeholders",
         "detectable_format:number_highlighted_sections", "length_constraints:number_paragraphs",
         "detectable_format:number_bullet_lists", "detectable_format:title", "detectable_content:postscript",
         "startend:end_checker", "punctuation:no_comma", "length_constraints:number_words",
         "length_constraints:number_sentences", "keywords:forbidden_words", "change_case:english_capital",
         "change_case:english_lowercase", "startend:quotation"]


def paragraphs(text, n):
    parts = text.split(". ")
    half = max(1, len(parts) // n)
    chunks = [". ".join(parts[i * half:(i + 1) * half if i < n - 1 else len(parts)]) for i in range(n)]
    chunks = [c if c.endswith(".") else c + "." for c in chunks]
    return "\n\n***\n\n".join(chunks)


def include_words(text, words):
    extra = " ".join(f"It is {w}." for w in words)
    return f"{text} {extra}"


def bullets(text, n, rng):
    lines = [s.rstrip(".") + "." for s in text.split(". ")]
    while len(lines) < n:
        lines.append(rng.choice(["It is worth a visit.", "It can surprise you.", "It stays in memory."]))
    return "\n".join(f"* {line}" for line in lines[:n])


def highlights(text, n):
    words = text.split(" ")
    for i in range(n):
        k = 1 + 3 * i
        if k < len(words):
            words[k] = f"*{words[k]}*"
    return " ".join(words)


def base_answer(rng, topic, ids):
    """Two or three plain sentences (no comma, no forbidden word)."""
    return " ".join(sentences(rng, topic, 2 if any(i.startswith("length_constraints") for i in ids) else 3))


def violate(i, text, kw):
    """`text` changed so that it breaks instruction `i` (before the other instructions apply)."""
    if i in ("length_constraints:number_words", "length_constraints:number_sentences"):
        return " ".join([text] * 4)
    if i == "punctuation:no_comma":
        return text.replace(" and ", ", and ", 1).rstrip(".") + ", and so on."
    if i == "keywords:forbidden_words":
        return f"{text} It is {kw['forbidden_words'][0]}."
    return text  # every other instruction is broken by leaving the plain text as it is


def complies(i, text, kw):
    """IFEval's check of instruction `i` (dev-time mirror, to build rows that pass and fail)."""
    words = re.findall(r"\w+", text)
    count_sentences = len(re.findall(r"[.!?](\s|$)", text))
    if i == "change_case:english_capital":
        return text.isupper()
    if i == "change_case:english_lowercase":
        return text.islower()
    if i == "punctuation:no_comma":
        return "," not in text
    if i == "length_constraints:number_words":
        return len(words) < kw["num_words"]
    if i == "length_constraints:number_sentences":
        return count_sentences < kw["num_sentences"]
    if i == "length_constraints:number_paragraphs":
        parts = re.split(r"\s?\*\*\*\s?", text)
        return len(parts) == kw["num_paragraphs"] and all(p.strip() for p in parts)
    if i == "keywords:existence":
        return all(re.search(k, text, re.I) for k in kw["keywords"])
    if i == "keywords:forbidden_words":
        return not any(re.search(r"\b" + w + r"\b", text, re.I) for w in kw["forbidden_words"])
    if i == "keywords:frequency":
        return len(re.findall(kw["keyword"], text, re.I)) >= kw["frequency"]
    if i == "detectable_format:title":
        return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))
    if i == "detectable_format:number_bullet_lists":
        found = re.findall(r"^\s*\*[^\*].*$", text, re.M) + re.findall(r"^\s*-.*$", text, re.M)
        return len(found) == kw["num_bullets"]
    if i == "detectable_content:postscript":
        return bool(re.findall(r"\s*p\.\s?s\..*$", text.lower(), re.M))
    if i == "startend:end_checker":
        return text.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())
    if i == "startend:quotation":
        t = text.strip()
        return len(t) > 1 and t[0] == '"' and t[-1] == '"'
    if i == "detectable_format:number_highlighted_sections":
        marked = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
        return len(marked) >= kw["num_highlights"]
    if i == "detectable_content:number_placeholders":
        return len(re.findall(r"\[.*?\]", text)) >= kw["num_placeholders"]
    if i == "combination:repeat_prompt":
        return text.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())
    raise ValueError(i)


def answer(rng, plain, ids, kwargs, broken=None):
    """The plain text made to follow every instruction (but `broken`, which it breaks)."""
    text = plain if broken is None else violate(broken, plain, kwargs[ids.index(broken)])
    for i in sorted(ids, key=ORDER.index):
        if i != broken:
            text = INSTRUCTIONS[i][2](text, kwargs[ids.index(i)], rng)
    return text


def instruction_row(rng, template):
    request, ids, phrasings, before = template
    topic = rng.choice(TOPICS)
    req = request.format(t=topic)
    kwargs = [INSTRUCTIONS[i][1](rng) for i in ids]
    plain = base_answer(rng, topic, ids)
    for i, kw in zip(ids, kwargs):
        if i == "combination:repeat_prompt":
            kw["prompt_to_repeat"] = req
        if i == "keywords:existence":
            kw["keywords"] = rng.sample([k for k in KEYWORDS if not re.search(k, plain, re.I)], 2)
        if i == "keywords:frequency":
            kw["keyword"] = rng.choice([k for k in KEYWORDS if not re.search(k, plain, re.I)])
    good = answer(rng, plain, ids, kwargs)
    # Length limits are set from the answer: a little above what it uses.
    for i, kw in zip(ids, kwargs):
        if i == "length_constraints:number_words":
            kw["num_words"] = len(re.findall(r"\w+", good)) + rng.randint(3, 12)
        if i == "length_constraints:number_sentences":
            kw["num_sentences"] = len(re.findall(r"[.!?](\s|$)", good)) + rng.randint(1, 3)
    bad = answer(rng, plain, ids, kwargs, broken=rng.choice(ids))
    assert all(complies(i, good, kw) for i, kw in zip(ids, kwargs)), (ids, kwargs, good)
    assert not all(complies(i, bad, kw) for i, kw in zip(ids, kwargs)), (ids, kwargs, bad)
    texts = [phrasing.format(**{k: fmt(v) for k, v in kw.items()}) for phrasing, kw in zip(phrasings, kwargs)]
    prompt = " ".join(texts + [req]) if before else " ".join([req] + texts)
    return dict(task=ids[0].split(":")[0], prompt=prompt, good=good, bad=bad, instruction_id_list=list(ids),
                kwargs=kwargs, bad_reward=0.0)


def fmt(value):
    if isinstance(value, list):
        return ", ".join(f"'{v}'" for v in value)
    return str(value)


def instruction_templates(rng, split):
    """Request phrasing x one instruction (or a combinable pair) x that instruction's phrasing x
    order. Each instruction's last phrasing is the test split's; the others, the train split's."""
    out = []
    for ids in [(i,) for i in INSTRUCTIONS] + COMBINABLE:
        for request in REQUESTS:
            choices = [INSTRUCTIONS[i][0] for i in ids]
            phrasings = tuple(c[-1] if split == "test" else rng.choice(c[:-1]) for c in choices)
            out.append((request, ids, phrasings, rng.random() < 0.5))
    return out


# ---------------------------------------------------------------------------------------------


def split_templates(rng, templates, key):
    """Train and test templates, disjoint by `key` (the phrasing that must be unseen in test)."""
    keys = sorted({key(t) for t in templates}, key=str)
    rng.shuffle(keys)
    held = set(keys[:max(1, round(len(keys) * TEST_SHARE))])
    return [t for t in templates if key(t) not in held], [t for t in templates if key(t) in held]


def families(rng):
    """(name, maker, templates (None: built per split), key of the held-out phrasing)."""
    return [
        ("arithmetic", arithmetic_expr, EXPR_TEMPLATES, lambda t: t),
        ("word_problem", word_problem, [(p, s) for p in WORD_PROBLEMS for s in WORD_SUFFIXES], lambda t: t[0][0]),
        ("unit_conversion", conversion, CONVERSION_TEMPLATES, lambda t: t),
        # Held out: whole request phrasings and, per instruction, its last phrasing.
        ("instructions", instruction_row, None, lambda t: t[0]),
    ]


def rows_of(rng, maker, templates, count, seen):
    out = []
    while len(out) < count:
        ex = maker(rng, rng.choice(templates))
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out


SIZES = {"sft/train": 600, "sft/test": 150, "preference/train": 600, "preference/test": 150}
MIX = {"arithmetic": 0.2, "word_problem": 0.1, "unit_conversion": 0.15, "instructions": 0.55}


def checks(ex):
    return {k: ex[k] for k in ("answer", "instruction_id_list", "kwargs") if k in ex}


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(out_dir=HERE):
    rng = random.Random(SEED)
    splits = {}
    for name, maker, templates, key in families(rng):
        if templates is None:
            train_t, _ = split_templates(rng, instruction_templates(rng, "train"), key)
            held = {t[0] for t in instruction_templates(random.Random(0), "test")} - {t[0] for t in train_t}
            test_t = [t for t in instruction_templates(rng, "test") if t[0] in held]
        else:
            train_t, test_t = split_templates(rng, templates, key)
        splits[name] = (maker, train_t, test_t)
    seen = set()
    for part, size in SIZES.items():
        exs = []
        for k, (name, share) in enumerate(MIX.items()):
            maker, train_t, test_t = splits[name]
            count = size - len(exs) if k == len(MIX) - 1 else round(size * share)
            exs += rows_of(rng, maker, test_t if part.endswith("test") else train_t, count, seen)
        rng.shuffle(exs)
        if part.startswith("sft"):
            rows = [dict(prompt=user(e["prompt"]), completion=assistant(e["good"]), task=e["task"], **checks(e))
                    for e in exs]
        else:
            rows = [dict(prompt=user(e["prompt"]), chosen=assistant(e["good"]), rejected=assistant(e["bad"]),
                         reward_chosen=1.0, reward_rejected=e["bad_reward"], task=e["task"], **checks(e)) for e in exs]
        write(os.path.join(out_dir, part + ".jsonl"), rows)


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
