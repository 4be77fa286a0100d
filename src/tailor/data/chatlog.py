"""Chat transcripts (support logs, ShareGPT, OpenAI chat) → canonical `messages` conversations.

A transcript names speakers ("Agent Maria", "customer", "gpt"); training needs roles (user, assistant, system). A
speaker gets its role from, in order: the configured `speaker_roles` mapping (case-insensitive), a word in its name
that says which side it is on ("agent", "support", "bot" → assistant; "customer", "caller", "human" → user), and
last the order of appearance (whoever speaks first in a conversation is the user, the other the assistant).
Consecutive turns of one role are merged into one message: people send several short messages in a row, and the
chat format wants user and assistant to alternate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from tailor.errors import TailorError

ROLES = ("system", "user", "assistant")
# keys of one turn in a per-turn transcript (one CSV row or JSON line per message)
SPEAKER_KEYS = ("speaker", "from", "role", "author", "sender", "participant")
TURN_TEXT_KEYS = ("text", "message", "content", "value", "body", "utterance")
CONVERSATION_KEYS = ("conversation_id", "conversation", "thread_id", "session_id", "chat_id", "dialog_id",
                     "dialogue_id", "ticket_id", "ticket")
_ASSISTANT_WORDS = frozenset({"assistant", "agent", "support", "bot", "chatbot", "gpt", "ai", "operator", "staff",
                              "representative", "rep", "advisor", "adviser", "clerk", "helpdesk", "model",
                              "moderator", "service", "city"})
_USER_WORDS = frozenset({"user", "customer", "client", "caller", "visitor", "resident", "human", "guest", "patient",
                         "member", "prompter", "citizen", "buyer", "student"})
_WORDS = re.compile(r"[a-z]+")


def check_speaker_roles(mapping: Mapping[str, str], where: str = "ingest.speaker_roles") -> dict[str, str]:
    """The mapping with lower-cased speakers; a role that is not system/user/assistant raises naming the key."""
    checked = {}
    for speaker, role in mapping.items():
        if role not in ROLES:
            raise TailorError(f"{where}.{speaker}: role must be one of {', '.join(ROLES)} (found {role!r})")
        checked[str(speaker).strip().lower()] = role
    return checked


def detect_role(speaker: str, mapping: Mapping[str, str]) -> str | None:
    """The role of a speaker by the mapping or by a telling word in its name; None when neither says."""
    name = speaker.strip().lower()
    if name in mapping:
        return mapping[name]
    if name in ROLES:
        return name
    words = set(_WORDS.findall(name))
    is_assistant, is_user = bool(words & _ASSISTANT_WORDS), bool(words & _USER_WORDS)
    if is_assistant != is_user:
        return "assistant" if is_assistant else "user"
    return None


def turns_to_messages(turns: Iterable[tuple[str, str]], mapping: Mapping[str, str], where: str) -> list[dict]:
    """(speaker, text) turns → alternating {role, content} messages, consecutive turns of one role merged.

    Speakers no rule places take the free side by order of appearance; a third such speaker raises, naming `where`.
    """
    mapping = {str(key).strip().lower(): value for key, value in mapping.items()}
    turns = [(speaker.strip(), text.strip()) for speaker, text in turns if text and text.strip()]
    roles: dict[str, str] = {}
    for speaker, _ in turns:
        if speaker.lower() not in roles:
            role = detect_role(speaker, mapping)
            if role is not None:
                roles[speaker.lower()] = role
    for speaker, _ in turns:  # the rest by order of appearance, on the side no one has taken yet
        if speaker.lower() in roles:
            continue
        taken = set(roles.values())
        free = [role for role in ("user", "assistant") if role not in taken]
        if not free:
            raise TailorError(f"{where}: cannot tell whether speaker {speaker!r} is the user or the assistant; "
                              f"map it in ingest.speaker_roles (e.g. '{speaker}: assistant')")
        roles[speaker.lower()] = free[0]
    messages: list[dict] = []
    for speaker, text in turns:
        role = roles[speaker.lower()]
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def render(messages: Iterable[Mapping[str, str]]) -> str:
    """A conversation as plain text for the corpus: 'User: …' paragraphs."""
    return "\n\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in messages)


def turn_keys(record: Mapping) -> tuple[str, str, str | None] | None:
    """(speaker key, text key, conversation key or None) when `record` is one turn of a transcript, else None."""
    speaker = next((key for key in SPEAKER_KEYS if key in record), None)
    text = next((key for key in TURN_TEXT_KEYS if key in record), None)
    if speaker is None or text is None:
        return None
    return speaker, text, next((key for key in CONVERSATION_KEYS if key in record), None)


def conversation_turns(record: Mapping) -> list[tuple[str, str]] | None:
    """The (speaker, text) turns of a whole-conversation record: OpenAI `messages` or ShareGPT `conversations`."""
    for key in ("messages", "conversations", "conversation", "turns", "dialogue"):
        value = record.get(key)
        if isinstance(value, list) and value and all(isinstance(turn, dict) for turn in value):
            keys = turn_keys(value[0])
            if keys is None:
                return None
            speaker_key, text_key, _ = keys
            return [(str(turn.get(speaker_key, "")), turn.get(text_key) if isinstance(turn.get(text_key), str)
                     else "") for turn in value]
    return None
