"""Record llama.cpp's own pre-tokenizer splits for every regex set in the table.

    python tests/formats/record_pretok_oracle.py LLAMA_CPP_DIR

LLAMA_CPP_DIR is a llama.cpp source tree of the version the table came from
(LLAMA_CPP_SOURCE), e.g. `vendor/llama.cpp` of the llama-cpp-python 0.3.36
sdist (`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`).
Its src/unicode.cpp and src/unicode-data.cpp build on their own: a small C++
driver calls `unicode_regex_split(text, regex_exprs, byte_encode=false)` with
the table's verbatim regexes, in the C locale as libllama runs. The words go
to tests/formats/data/pretok_llamacpp.json as code-point lengths (llama.cpp's
zero-length words, which encode to nothing, are dropped), read by
tests/formats/test_tokenizer_pretok.py. A development tool: ember never imports it.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from ember.formats.tokenizer_pretok_table import LLAMA_CPP_SOURCE, REFUSED, TYPES

OUT = Path(__file__).with_name("data") / "pretok_llamacpp.json"

DRIVER = r"""
#include "unicode.h"
#include <iostream>
#include <string>
#include <vector>
// stdin lines: "<n> <regex hex> x n <text hex>"; stdout: each word's hex followed by '-'
static std::string unhex(const std::string & h) {
    std::string s;
    for (size_t i = 0; i + 1 < h.size(); i += 2) s.push_back((char) std::stoi(h.substr(i, 2), nullptr, 16));
    return s;
}
static std::string tohex(const std::string & s) {
    static const char * d = "0123456789abcdef";
    std::string h;
    for (unsigned char c : s) { h.push_back(d[c >> 4]); h.push_back(d[c & 15]); }
    return h;
}
int main() {
    std::string line, part;
    while (std::getline(std::cin, line)) {
        std::vector<std::string> parts;
        for (size_t p = 0, q; p <= line.size(); p = q + 1) {
            q = line.find(' ', p);
            if (q == std::string::npos) q = line.size();
            parts.push_back(line.substr(p, q - p));
        }
        const int n = std::stoi(parts[0]);
        std::vector<std::string> rx;
        for (int i = 0; i < n; i++) rx.push_back(unhex(parts[1 + i]));
        for (const auto & w : unicode_regex_split(unhex(parts[1 + n]), rx, false)) std::cout << tohex(w) << "-";
        std::cout << std::endl;
    }
}
"""

# Every class the regexes tell apart: cases, marks, scripts, numbers, the whitespace llama.cpp
# folds, apostrophe suffixes, chameleon's sentinels, digit runs of every length mod 3.
PIECES = list("aAzZ09 '\t\n\r.,!?-_()[]{}$+<=>^~|`/\\\"#%&*:;@") + [
    "'s", "'LL", "'re", "'D", "IMGIMGABZ", "<sentinel:12>", "    ", "1234", "12345", "123456"] + list(
    "éÉßǅʰªµ\u0301\u0308\u093f\u0e31一龥ぁアｱ가힣ㄱㄅ\u3000\xa0\x85\u2028\u2009\u200b\u1680"
    "０１²½Ⅻ٣۴…。，、।۔،！“”‘’—：；〿︰﹏＄€©™🦙😀\U00020000\x01\x1c\x7f\u00ad\ufeff")
FIXED = ["Hello world", " Hello World!", "I'm sure it's 3.14159 -- isn't it?", "    indented\n\n\tcode()",
         "don'T STOP 'll", "Ünïcödé naïve café", "東京タワー 서울 1234567 ٣٤٥", "\u3000全角\u3000スペース\xa0nbsp",
         "line1\r\nline2\n\n\nend  ", "x = [1, 2, 3]; y = {'a': 4}", "IMGIMGAZ <sentinel:7> ok",
         "$100 + 20% < 3^2 ~ `|`", "🦙🦙 llama 🦙", "CamelCaseWord lowerUPPER ABCdef", "123 4567 89012 345678"]


def texts(n_random: int = 45, seed: int = 13) -> list[str]:
    rng = random.Random(seed)
    rand = ["".join(rng.choice(PIECES) for _ in range(rng.randrange(4, 28))) for _ in range(n_random)]
    return FIXED + rand


def build_driver(llama_cpp: Path, work: Path) -> Path:
    src = llama_cpp / "src"
    (work / "driver.cpp").write_text(DRIVER)
    exe = work / "driver"
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{src}", str(work / "driver.cpp"),
                    str(src / "unicode.cpp"), str(src / "unicode-data.cpp"), "-o", str(exe)], check=True)
    return exe


def record(exe: Path, cases: list[str]) -> dict[str, list[list[int]]]:
    lines = []
    types = [t for t in TYPES if t not in REFUSED]
    for t in types:
        rx = " ".join(r.encode().hex() for r in TYPES[t])
        lines += [f"{len(TYPES[t])} {rx} {s.encode().hex()}\n" for s in cases]
    out = subprocess.run([str(exe)], input="".join(lines), capture_output=True, text=True, check=True)
    rows = iter(out.stdout.splitlines())
    return {t: [[len(bytes.fromhex(w).decode()) for w in next(rows).split("-")[:-1] if w]
                for _ in cases] for t in types}


def main(argv: list[str]) -> int:
    llama_cpp = Path(argv[1])
    cases = texts()
    with tempfile.TemporaryDirectory() as tmp:
        splits = record(build_driver(llama_cpp, Path(tmp)), cases)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"source": LLAMA_CPP_SOURCE, "texts": cases, "word_lengths": splits},
                              ensure_ascii=True, separators=(",", ":")) + "\n")
    print(f"{OUT}: {len(splits)} regex sets x {len(cases)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
