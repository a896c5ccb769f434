"""The API key is scrubbed in every form a server may echo it in."""

from __future__ import annotations

import json
import urllib.parse

from hypothesis import given
from hypothesis import strategies as st

from batcher.scrub import MASK, KeyScrubber

KEYS = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=6, max_size=40)


def forms(key: str) -> dict[str, str]:
    """The key as servers write it back."""
    return {
        "raw": key,
        "json": json.dumps(key)[1:-1],
        "json-ascii": json.dumps(key, ensure_ascii=True)[1:-1],
        "json-slash": json.dumps(key)[1:-1].replace("/", "\\/"),
        "json-unicode": "".join(f"\\u{ord(c):04x}" for c in key if ord(c) < 0x10000),
        "url": urllib.parse.quote(key, safe=""),
        "url-path": urllib.parse.quote(key),
        "url-lower": urllib.parse.quote(key, safe="").lower()
        if key.isascii() and key.lower() == key else urllib.parse.quote(key, safe=""),
        "form": urllib.parse.quote_plus(key),
    }


@given(KEYS, st.sampled_from(sorted(forms("x"))), st.text(max_size=20), st.text(max_size=20))
def test_every_form_is_masked(key: str, form: str, before: str, after: str) -> None:
    echoed = forms(key)[form]
    text = f"{before}key={echoed}{after}"
    scrub = KeyScrubber(key)
    for found in (scrub.text(text), scrub.bytes(text.encode()).decode()):
        assert echoed not in found and key not in found
        assert MASK in found


def test_a_mixture_of_forms_is_masked_and_the_rest_kept() -> None:
    scrub = KeyScrubber("sk/live+SECRET/canary=7")
    assert scrub.text('{"error": "bad key sk\\/live%2bSECRET%2Fcanary=7", "code": "x"}') == (
        '{"error": "bad key ***", "code": "x"}')
    assert scrub.text("Location: https://h/login?key=sk%2Flive%2BSECRET%2Fcanary%3D7&x=1") == (
        "Location: https://h/login?key=***&x=1")
    # JSON that was valid stays valid.
    assert json.loads(scrub.bytes(json.dumps({"m": "sk/live+SECRET/canary=7"}).encode()))


def test_no_key_scrubs_nothing_and_the_repr_hides_the_key() -> None:
    assert KeyScrubber("").text("anything sk") == "anything sk"
    assert "canary" not in repr(KeyScrubber("sk-canary")) and not KeyScrubber("")
