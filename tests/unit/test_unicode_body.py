"""A JSON body's strings are Unicode text: JSON's grammar lets "\\ud800" name a lone surrogate,
which json.loads keeps and no tokenizer or UTF-8 encoder takes; not_unicode finds it and its place."""

import json

from hypothesis import given
from hypothesis import strategies as st

from loramux.server.openai_schema import not_unicode

# JSON values whose strings are all Unicode text (no surrogates: category Cs)
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
bodies = st.recursive(st.none() | st.booleans() | st.integers() | text,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=20)


@given(bodies)
def test_a_body_of_unicode_text_passes(body):
    assert not_unicode(json.loads(json.dumps(body))) is None


@given(bodies, st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]), st.booleans(), st.data())
def test_a_lone_surrogate_is_found_at_its_place(body, lone, as_key, data):
    """Wherever one string (a value, or a dict's key) gets a lone surrogate, that is the place named."""
    wrapped = {"model": "m", "body": body}
    place, node = ("body",), body
    while isinstance(node, (list, dict)) and node:  # walk down to a random container or leaf
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if not data.draw(st.booleans()):
            break
        place, node = (*place, key), node[key]
    parent = wrapped
    for key in place[:-1]:
        parent = parent[key]
    last = place[-1]
    if as_key:
        parent[last] = {"ok": 1, f"a{lone}b": 2}
        want = (*place, "a" + lone.encode("utf-8", "backslashreplace").decode() + "b")
    else:
        parent[last] = f"text {lone}"
        want = place
    parsed = json.loads(json.dumps(wrapped))  # ensure_ascii writes the surrogate as its escape
    assert not_unicode(parsed) == (want, lone)
    json.dumps({"param": ".".join(map(str, want))}, ensure_ascii=False).encode()  # the place can be written


def test_the_first_bad_string_in_document_order_is_named():
    assert not_unicode(json.loads('{"a": ["ok", "\\udc00"], "b": "\\ud800"}')) == (("a", 1), "\udc00")
    assert not_unicode(json.loads('"\\ud83d\\ude00 a pair is one character"')) is None
    assert not_unicode(json.loads('"\\\\ud800 is an escaped backslash"')) is None
    assert not_unicode(json.loads('"\\ud800"')) == ((), "\ud800")
