"""A corpus of strings written to stress a Gemma SentencePiece tokenizer.

Each group aims at one way tokenizers disagree: scripts the model never saw (byte fallback),
combining marks and ZWJ emoji (multi-code-point graphemes), whitespace runs and newlines (no
dummy prefix, no whitespace collapsing), digits (split_digits), code, and the chat control
pieces written inline. `CORPUS` is the flat list the tests iterate over.
"""

LATIN = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "hello",
    "Hello",
    "HELLO WORLD",
    "a",
    "I",
    "don't won't can't it's",
    "Café au lait, crème brûlée, and a piñata.",
    "Naïve coöperation at the façade of the Hôtel-Dieu.",
    "Zoë Saldaña und Jürgen Müller aßen Äpfel in Köln.",
    "Łódź, Kraków, Gdańsk — żółć gęślą jaźń.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Ærøskøbing og Ålborg ligger i Danmark.",
    "Hafnarfjörður þjóð ðæ",
    "İstanbul'da ılık bir gün; ağaçlar şöyle.",
    "Tiếng Việt có nhiều dấu: ă â ê ô ơ ư đ ạ ả ấ ầ ẩ ẫ ậ.",
    "Ça va? Où est la bibliothèque?",
    "¿Dónde está el baño? ¡Aquí!",
    "e\u0301 vs \u00e9 (combining acute vs precomposed)",
    "A\u030a\u0301 stacked combining marks",
    "ﬁ ﬂ ligatures and ＡＢＣ fullwidth letters",
    "Ⅻ roman numeral and ½ ¾ vulgar fractions",
    "“curly quotes” ‘single’ «guillemets» „low“",
    "em—dash en–dash minus−sign hyphen-minus",
    "ellipsis… and middle·dot and bullet • item",
    "™ © ® § ¶ † ‡ ° µ",
    "The ZIP code is 94043 and the year 2024.",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "Mr. Smith's cat—named \"Whiskers\"—sat on the mat.",
    "tokenization tokenizer tokenized tokens token",
    "running runner ran runs run",
    "un-believ-able",
    "e.g. i.e. etc. vs. a.m. p.m.",
    "ALL CAPS SENTENCE WITH SOME words in lower case",
    "MiXeD cAsE lEtTeRs",
    "  leading spaces",
    "trailing spaces  ",
    "x",
    "Q&A: R&D at AT&T",
    "user@example.com and https://example.org/path?q=1&r=two#frag",
    "C:\\Users\\name\\Documents\\file.txt",
    "/usr/local/bin/python3 --version",
]

CYRILLIC_GREEK = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Привет, мир!",
    "Україна: їжак, ґанок, єнот.",
    "Беларуская мова: ў і ё.",
    "Српски: Љубав, Њива, Џеп, Ђак, Ћерка.",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "Καλημέρα κόσμε",
    "αβγδεζηθικλμνξοπρστυφχψω ΑΒΓΔ",
    "ά έ ή ί ό ύ ώ ϊ ϋ ΐ ΰ",
    "Ѣ ѣ Ѳ ѳ Ѵ ѵ old Cyrillic letters",
]

RTL = [
    "مرحبا بالعالم",
    "اللغة العربية جميلة جدا.",
    "بِسْمِ اللَّهِ الرَّحْمَٰنِ الرَّحِيمِ",
    "الرقم ١٢٣٤٥٦٧٨٩٠ بالأرقام العربية",
    "فارسی: سلام، حال شما چطور است؟",
    "اردو: آپ کیسے ہیں؟",
    "שלום עולם",
    "עברית עם ניקוד: שָׁלוֹם",
    "Mixed English and עברית in one line",
    "\u202eright-to-left override\u202c and \u200fRLM\u200e LRM",
]

INDIC_SE_ASIAN = [
    "नमस्ते दुनिया",
    "हिन्दी एक सुंदर भाषा है।",
    "संस्कृतम् क्षत्रिय ज्ञान",
    "বাংলা ভাষা",
    "தமிழ் மொழி",
    "తెలుగు భాష",
    "ಕನ್ನಡ ಭಾಷೆ",
    "മലയാളം",
    "ગુજરાતી",
    "ਪੰਜਾਬੀ",
    "සිංහල",
    "สวัสดีครับ ยินดีที่ได้รู้จัก",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "ພາສາລາວ",
    "ភាសាខ្មែរ",
    "မြန်မာဘာသာ",
    "Tiếng Việt và ภาษาไทย và हिन्दी",
    "ཀ་ཁ་ག་ང་",
    "ქართული ენა",
    "Հայերեն լեզու",
    "አማርኛ ቋንቋ",
]

CJK = [
    "你好，世界！",
    "我爱自然语言处理。",
    "機器學習與深度學習",
    "繁體中文和简体中文",
    "日本語のテキストです。",
    "ひらがな カタカナ 漢字",
    "東京都渋谷区",
    "ｶﾀｶﾅ half-width katakana",
    "한국어 텍스트입니다.",
    "안녕하세요, 세계!",
    "ㄱㄴㄷ ㅏㅑㅓ jamo",
    "\u1100\u1161\u11a8 conjoining jamo",
    "中文English混合text",
    "𠀀𠀁𪚥 supplementary CJK ideographs",
    "〒100-0001 東京都千代田区",
    "「引用」『二重』【括弧】",
    "一二三四五六七八九十百千万",
    "令和６年１２月３１日",
]

EMOJI = [
    "😀",
    "😀😃😄😁",
    "I ❤️ Keras",
    "👍🏽 thumbs up, medium skin tone",
    "👨‍👩‍👧‍👦 family (ZWJ sequence)",
    "👩🏾‍💻 woman technologist",
    "🏳️‍🌈 rainbow flag",
    "🏴‍☠️ pirate flag",
    "🇺🇸🇯🇵🇩🇪 flags",
    "🧑‍🤝‍🧑 people holding hands",
    "❤️‍🔥 heart on fire",
    "🫠🫨🪿 newer emoji",
    "1️⃣ 2️⃣ #️⃣ keycaps",
    "☕ coffee ☀ sun ☁ cloud",
    "🐍 Python and 🦀 Rust",
    "text🙂text",
    "👋\u200d without partner",
    "\u200b zero width space \u200b",
    "\ufeffbyte order mark at start",
    "variation selector: ︎ and ️",
]

WHITESPACE = [
    "",
    " ",
    "  ",
    "   ",
    "    ",
    "        ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "\r",
    " \n ",
    "a b",
    "a  b",
    "a   b",
    "a    b",
    "a\tb",
    "a\t\tb",
    "a\nb",
    "a\n\nb",
    "a \n b",
    "line one\nline two\nline three",
    "paragraph one.\n\nparagraph two.",
    "tab\tseparated\tvalues\t1\t2",
    "\u00a0non-breaking\u00a0space",
    "\u2003em space\u2009thin space\u3000ideographic space",
    "trailing newline\n",
    "\nleading newline",
    " \t \t mixed",
    "word" + " " * 17 + "word",
    "\v vertical tab \f form feed",
]

NUMBERS = [
    "0",
    "7",
    "42",
    "123",
    "2024",
    "3.14159",
    "-273.15",
    "1,000,000",
    "1e-10",
    "0x1F 0b1010 0o777",
    "12345678901234567890",
    "3141592653589793238462643383279502884197169399375105820974944592",
    "Call 555-0123 or +1 (650) 253-0000.",
    "Version 1.2.3-rc4",
    "2024-12-31T23:59:59Z",
    "$19.99, €5, £3, ¥1000, ₹250",
    "50% off, 3/4 cup, 2^10 = 1024",
    "room 101 and 202 and 303",
    "a1b2c3d4",
    "١٢٣ ٤٥٦ Arabic-Indic digits",
    "१२३ Devanagari digits",
    "①②③ circled digits",
    "𝟘𝟙𝟚 mathematical digits",
]

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i)",
    "if (x > 0 && y < 10) { z = x * y; }",
    "#include <stdio.h>\nint main(void) { printf(\"hi\\n\"); return 0; }",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "const f = (x) => x ** 2; // square",
    "<div class=\"box\"><p>Hello</p></div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "x = [i**2 for i in range(100) if i % 3 == 0]",
    "fn main() { let v: Vec<i32> = vec![1, 2, 3]; }",
    "$ pip install keras-gemma && echo done",
    "git commit -m 'fix: off-by-one in packer'",
    "    indented with four spaces",
    "\t\tindented with two tabs",
    "import numpy as np\nimport keras\n\nmodel = keras.Sequential()\n",
    "a==b!=c<=d>=e<<f>>g",
    "lambda x: x if x else None",
    "regex: ^[a-z0-9_]+@[a-z]+\\.[a-z]{2,}$",
    "class Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n    pass",
    "// TODO(someone): handle the empty case\n",
    "```python\nprint('fenced')\n```",
    "| col1 | col2 |\n|------|------|\n| 1    | 2    |",
    "\\frac{a}{b} + \\sqrt{x^2 + y^2}",
    "∀x ∈ ℝ: x² ≥ 0 ⇒ √(x²) = |x|",
    "<|endoftext|> [CLS] [SEP] </s> <s>",
]

CHAT = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_turn>user\nHello!<end_of_turn>\n",
    "<start_of_turn>model\nHi, how can I help?<end_of_turn>\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "text<start_of_turn>text",
    "<start_of_turn><end_of_turn>",
    "<start_of_turn><start_of_turn>",
    "<end_of_turn>\n<end_of_turn>",
    "<start_of_turn> user",
    " <start_of_turn>",
    "<start_of_turn",
    "start_of_turn>",
    "<START_OF_TURN>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<bos>not really a bos",
    "<mask>",
]

MIXED = [
    "Hello, мир! 你好! مرحبا! 🌍",
    "Keras 3 runs on JAX, TensorFlow, and PyTorch.",
    "Gemma is a family of lightweight, open models.",
    "The price is €12.50 (≈ $13.40) — tax incl.",
    "日本語とEnglishと한국어とРусский",
    "Emoji in the middle 🎉 of a sentence.",
    "URL: https://ai.google.dev/gemma?utm=1 ✨",
    "Name:\tAlice\nAge:\t30\nCity:\tZürich",
    "Q: ¿Qué hora es?\nA: Son las 3:45 p.m.",
    "ASCII art:\n  /\\_/\\\n ( o.o )\n  > ^ <",
    "a\u0000b null byte inside",
    "control \u0001\u0002\u0003 characters",
    "\u00ad soft hyphen and \u2060 word joiner",
    "🇫🇷 Paris — «Bonjour!» — 2 €",
    "Σ(x_i) / n = μ",
    "The ratio is 1:2:3 and 10:30 am.",
    "naïve résumé café",
    "😀 " * 5,
    "ab" * 40,
    "The end.",
]


def _sentences():
    """A few hundred deterministic sentences, so the corpus also holds ordinary prose."""
    subjects = ["The model", "A tokenizer", "Our team", "Every layer", "Gemma", "Keras"]
    verbs = ["reads", "writes", "splits", "joins", "learns", "predicts"]
    objects = ["the text", "numbers like 90210", "ünïcödé", "日本語", "emoji 🙂", "tabs\tand spaces"]
    out = []
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            o = objects[(i + 2 * j) % len(objects)]
            out.append(f"{s} {v} {o}.")
    return out


CORPUS = (
    LATIN
    + CYRILLIC_GREEK
    + RTL
    + INDIC_SE_ASIAN
    + CJK
    + EMOJI
    + WHITESPACE
    + NUMBERS
    + CODE
    + CHAT
    + MIXED
    + _sentences()
)

assert len(CORPUS) >= 200, len(CORPUS)
