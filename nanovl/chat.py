r"""
The DeepSeek chat template, rendered straight into token ids and a loss mask (official conversation.py and
processing_vlm.py; paper section 3.2.3; facts sheet section 9).

The official prompt string, for a system prompt SYS and messages m0 (user), m1 (assistant), m2 (user), ...:

    SYS + "\n\n" + "User: " + m0 + "\n\n" + "Assistant: " + m1 + "<｜end▁of▁sentence｜>" + "User: " + m2 + ...

and, to ask for an answer, a final "Assistant:" with nothing after it. Each content is stripped, and the whole string is
stripped (processing_vlm.py's apply_sft_template_for_multi_turn_prompts; cli_chat.py builds its history without
stripping, see nanovl/generate.py). Every `<image_placeholder>` becomes n_image_tokens copies of the image id (576 for
the released models).

We never build that string and then search it for offsets. Like nanochat, we encode each piece separately and
concatenate the ids, with a mask bit per token: 1 for what the model learns to say (the assistant's answers and their
end-of-sentence token), 0 for everything else (BOS, system prompt, role names, the user's turns, image tokens). Bit i is
about token i itself: where it is 1, the model is trained to predict ids[i] from ids[:i] (data.collate shifts ids and
mask by one into inputs and targets), so BOS, which nothing predicts, always has 0. The pieces are cut where the
DeepSeek pre-tokenizer always cuts (at newlines, special tokens, and between "Assistant:" and the space that starts an
answer), so the ids equal the tokenizer's encoding of the whole official string; a test checks this. (That holds for a
conversation that ends with an answer, or with the "Assistant:" that asks for one. One that ends with a user's turn
keeps that turn's "\n\n", which the official string's final strip drops.)

Pretraining documents (stages 1 and 2) use no template: BOS, the text with its images, EOS, and the loss on the text
tokens and EOS only (paper section 3.2: next-token prediction on language tokens).
"""

from typing import List, Sequence, Tuple

from nanovl.tokenizer import EOS, IMAGE

IMAGE_TAG = IMAGE  # "<image_placeholder>", where an image goes in a message
# VLChatProcessor's fixed system prompt.
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                 "the user provides, and assist the user with a variety of tasks using natural language.")
ROLES = ("user", "assistant")


def check_conversation(conversation: Sequence[dict]) -> None:
    """Raise ValueError unless the conversation alternates user/assistant turns, starting with the user."""
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(f"the conversation must be a list of messages, got {type(conversation).__name__}")
    if not conversation:
        raise ValueError("empty conversation: expected at least one user message")
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a string 'content', got {msg!r}")
        if msg.get("role") != ROLES[i % 2]:
            raise ValueError(f"message {i} has role {msg.get('role')!r}, expected {ROLES[i % 2]!r}: turns alternate "
                             "user, assistant, user, ... starting with the user")
        if not msg["content"].strip():
            raise ValueError(f"message {i} ({msg['role']}) is empty")


def prompt_string(conversation: Sequence[dict], system: str = SYSTEM_PROMPT, generation_prompt: bool = False) -> str:
    """The official prompt string, exactly as conversation.py builds it (with images as single placeholders)."""
    parts = [system + "\n\n"] if system else []
    for i, msg in enumerate(conversation):
        role = "User" if i % 2 == 0 else "Assistant"
        parts.append(f"{role}: {msg['content'].strip()}" + ("\n\n" if i % 2 == 0 else EOS))
    if generation_prompt:
        parts.append("Assistant:")
    return "".join(parts).strip()


def expand_images(ids: List[int], mask: List[int], image_id: int, n_image_tokens: int) -> Tuple[List[int], List[int]]:
    """Replace each image id by n_image_tokens copies of it, never supervised."""
    if type(n_image_tokens) is not int or n_image_tokens < 1:  # (0 deleted every image's place without a word)
        raise ValueError(f"n_image_tokens must be the model's tokens per image (cfg.n_image_tokens), at least 1; got "
                         f"{n_image_tokens!r}")
    out_ids, out_mask = [], []
    for t, m in zip(ids, mask):
        if t == image_id:
            out_ids += [image_id] * n_image_tokens
            out_mask += [0] * n_image_tokens
        else:
            out_ids.append(t)
            out_mask.append(m)
    return out_ids, out_mask


def start_ids(tokenizer, system: str = SYSTEM_PROMPT) -> List[int]:
    r"""BOS, then the system prompt and its blank line (nothing more when there is no system prompt). The official
    code strips the whole prompt string, which trims whitespace before the system prompt but not after it. So it is
    lstrip()ed here, and encoded together with the "\n\n" after it, as one piece: whitespace at its end and those
    newlines then become the same tokens as in the official string."""
    if not isinstance(system, str):  # (None failed as "'NoneType' object has no attribute 'strip'")
        raise ValueError(f"expected the system prompt as a string ('' for none), got {type(system).__name__}")
    ids = [tokenizer.bos_id]
    if system.strip():
        ids += tokenizer.encode(system.lstrip() + "\n\n")
    return ids


def user_ids(tokenizer, content: str) -> List[int]:
    r"""One user message and its blank line: "User: ...\n\n" (the generation's chat session adds turns with it)."""
    return tokenizer.encode(f"User: {content.strip()}") + tokenizer.encode("\n\n")


def render_chat(conversation: Sequence[dict], tokenizer, n_image_tokens: int, system: str = SYSTEM_PROMPT,
                generation_prompt: bool = False) -> Tuple[List[int], List[int]]:
    """A conversation -> (ids, mask). With generation_prompt the ids end in "Assistant:", ready for sampling."""
    check_conversation(conversation)
    ids, mask = [], []

    def add(tokens: List[int], supervised: int):
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    add(start_ids(tokenizer, system), 0)
    for i, msg in enumerate(conversation):
        content = msg["content"].strip()
        if i % 2 == 0:
            add(user_ids(tokenizer, content), 0)
        else:
            add(tokenizer.encode("Assistant:"), 0)
            add(tokenizer.encode(" " + content), 1)  # the answer ...
            add([tokenizer.eos_id], 1)  # ... and its end-of-sentence token, so the model learns to stop
    if generation_prompt:
        add(tokenizer.encode("Assistant:"), 0)
    return expand_images(ids, mask, tokenizer.image_id, n_image_tokens)


def render_document(text: str, tokenizer, n_image_tokens: int) -> Tuple[List[int], List[int]]:
    """A pretraining document (text with any number of <image_placeholder>) -> (ids, mask): loss on text and EOS."""
    if not text.strip():
        raise ValueError("empty document")
    ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    mask = [0] + [1] * (len(ids) - 1)
    return expand_images(ids, mask, tokenizer.image_id, n_image_tokens)


def show(ids: Sequence[int], mask: Sequence[int], tokenizer, tokens: bool = False) -> str:
    """A rendered sample as text for debugging: image spans collapsed to [image x N], supervised text inside ⟦ ⟧.

    With tokens=True every token is shown separately, as `|piece|`, to see exactly where the tokenizer cut.
    """
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == tokenizer.image_id:
            j = i
            while j < n and ids[j] == tokenizer.image_id:
                j += 1
            out.append(f"[image x{j - i}]")
            i = j
            continue
        j = i
        while j < n and mask[j] == mask[i] and ids[j] != tokenizer.image_id:
            j += 1
        run = ids[i:j]
        text = "".join(f"|{tokenizer.decode([t])}" for t in run) + "|" if tokens else tokenizer.decode(run)
        out.append(f"⟦{text}⟧" if mask[i] else text)
        i = j
    return "".join(out)
