"""The chat template and loss masks, token by token."""

import pytest

from nanovl.chat import IMAGE_TAG, SYSTEM_PROMPT, prompt_string, render_chat, render_document, show
from nanovl.tokenizer import Tokenizer

N_IMG = 5  # image tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    corpus = [SYSTEM_PROMPT, "User: Assistant: What colour is the circle? The circle is red. Describe the image.",
              "def f(x):\n    return x + 1\n\n", "Two shapes on a white background: a red circle at the top left."] * 3
    return Tokenizer.train(corpus, vocab_size=400)


def expanded(ids, tok):
    out = []
    for t in ids:
        out += [t] * N_IMG if t == tok.image_id else [t]
    return out


CONVERSATIONS = {
    "single": [{"role": "user", "content": IMAGE_TAG + "Describe the image."},
               {"role": "assistant", "content": "Two shapes on a white background."}],
    "multi_turn_multi_image": [
        {"role": "user", "content": f"{IMAGE_TAG}{IMAGE_TAG}Which picture has more shapes?"},
        {"role": "assistant", "content": "The first one."},
        {"role": "user", "content": f"And this one? {IMAGE_TAG}\n  "},
        {"role": "assistant", "content": "  It has a red circle at the top left.\n"}],
    "text_only": [{"role": "user", "content": "What does f do?\n\ndef f(x):\n    return x + 1"},
                  {"role": "assistant", "content": "It adds one."},
                  {"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You're welcome 🙂"}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_equals_encoding_the_official_prompt_string(tok, name):
    conv = CONVERSATIONS[name]
    ids, mask = render_chat(conv, tok, N_IMG)
    assert ids == expanded(tok.encode(prompt_string(conv), bos=True), tok)
    assert len(mask) == len(ids)


def test_official_single_turn_prompt():
    assert SYSTEM_PROMPT == ("You are a helpful language and vision assistant. You are able to understand the visual "
                             "content that the user provides, and assist the user with a variety of tasks using "
                             "natural language.")  # VLChatProcessor's, word for word (facts sheet section 9)
    conv = [{"role": "user", "content": "<image_placeholder>Describe each stage of this image."}]
    assert prompt_string(conv, generation_prompt=True) == (
        SYSTEM_PROMPT + "\n\nUser: <image_placeholder>Describe each stage of this image.\n\nAssistant:")


def test_official_multi_turn_prompt(tok):
    # The separators between turns, written out (facts sheet section 9): an answer ends with the end-of-sentence and
    # the next "User:" follows it at once, with no newline. The renderer is checked against prompt_string elsewhere;
    # this pins prompt_string itself, so that one misreading cannot change both (and the SFT template with them).
    conv = [{"role": "user", "content": " q1 "}, {"role": "assistant", "content": "a1\n"},
            {"role": "user", "content": "q2"}]
    assert prompt_string(conv, generation_prompt=True) == (
        SYSTEM_PROMPT + "\n\nUser: q1\n\nAssistant: a1<｜end▁of▁sentence｜>User: q2\n\nAssistant:")
    ids, mask = render_chat(conv + [{"role": "assistant", "content": "a2"}], tok, 4)
    assert tok.decode(ids) == ("<｜begin▁of▁sentence｜>" + SYSTEM_PROMPT + "\n\nUser: q1\n\nAssistant: a1"
                               "<｜end▁of▁sentence｜>User: q2\n\nAssistant: a2<｜end▁of▁sentence｜>")
    learnt = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learnt == " a1<｜end▁of▁sentence｜> a2<｜end▁of▁sentence｜>"  # the loss on the answers and their ends alone


def test_only_answers_and_their_end_of_sentence_are_supervised(tok):
    conv = CONVERSATIONS["multi_turn_multi_image"]
    ids, mask = render_chat(conv, tok, N_IMG)
    # Cut the sequence into runs of equal mask and read them back.
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs.append((mask[start], tok.decode(ids[start:i])))
            start = i
    supervised = [text for m, text in runs if m]
    eos = "<｜end▁of▁sentence｜>"
    assert supervised == [" The first one." + eos, " It has a red circle at the top left." + eos]
    assert sum(mask) == sum(len(tok.encode(" " + a["content"].strip())) + 1 for a in conv[1::2])
    # image tokens are all there, in three spans of N_IMG, none supervised
    assert ids.count(tok.image_id) == 3 * N_IMG
    assert all(m == 0 for t, m in zip(ids, mask) if t == tok.image_id)
    assert ids[0] == tok.bos_id and mask[0] == 0


def test_generation_prompt_ends_with_the_assistant_role(tok):
    conv = CONVERSATIONS["single"][:1]
    ids, mask = render_chat(conv, tok, N_IMG, generation_prompt=True)
    assert tok.decode(ids).endswith("\n\nAssistant:") and sum(mask) == 0
    assert ids == expanded(tok.encode(prompt_string(conv, generation_prompt=True), bos=True), tok)


def test_no_system_prompt(tok):
    conv = CONVERSATIONS["text_only"]
    for system in ("", " \n "):  # one of spaces is none as well: the official prompt string is stripped whole
        ids, _ = render_chat(conv, tok, N_IMG, system=system)
        assert tok.decode(ids).startswith("<｜begin▁of▁sentence｜>User: What does f do?")
        assert ids == tok.encode(prompt_string(conv, system=system), bos=True)
    # None is not "no system prompt": named, as an image count of 0 is (which deleted every image's place)
    with pytest.raises(ValueError, match=r"expected the system prompt as a string \('' for none\), got NoneType"):
        render_chat(conv, tok, N_IMG, system=None)
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match=rf"n_image_tokens must be .* at least 1; got {n!r}$"):
            render_chat(CONVERSATIONS["single"], tok, n)


@pytest.mark.parametrize("system", ["Be brief. ", "  Be brief.", "Be brief.\n", "Be brief.\t \n"])
def test_a_system_prompt_with_whitespace_at_its_ends_renders_as_the_official_string(tok, system):
    # The official string keeps the system prompt as given (then strips the whole: its start only)
    conv = CONVERSATIONS["single"]
    ids, _ = render_chat(conv, tok, N_IMG, system=system)
    assert ids == expanded(tok.encode(prompt_string(conv, system=system), bos=True), tok)


def test_documents_supervise_text_and_end_but_not_images(tok):
    ids, mask = render_document(f"Look: {IMAGE_TAG}a red circle.", tok, N_IMG)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert [m for t, m in zip(ids, mask) if t == tok.image_id] == [0] * N_IMG
    assert mask[0] == 0 and mask[-1] == 1
    assert sum(mask) == len(ids) - 1 - N_IMG
    for blank in ("", " \n\t"):  # nothing to learn but where a document ends
        with pytest.raises(ValueError, match="empty document"):
            render_document(blank, tok, N_IMG)


@pytest.mark.parametrize("conv, message", [
    ([], "empty conversation"),
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "message 1 .assistant. is empty"),
    ([{"role": "user", "text": "a"}], "string 'content'"),
])
def test_malformed_conversations_are_refused(tok, conv, message):
    with pytest.raises(ValueError, match=message):
        render_chat(conv, tok, N_IMG)


def test_viewer_marks_images_and_supervised_tokens(tok):
    ids, mask = render_chat(CONVERSATIONS["single"], tok, N_IMG)
    text = show(ids, mask, tok)
    assert "User: [image x5]Describe the image.\n\nAssistant:⟦ Two shapes on a white background.<｜end▁of▁sentence｜>⟧" \
        in text
    assert show(ids[-3:], mask[-3:], tok, tokens=True).count("|") >= 4
