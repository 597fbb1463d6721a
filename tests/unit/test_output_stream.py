"""OutputStreams without a model: deltas, stop strings held back and cut, finish reasons, closes, merged backlogs."""

from cluster.contracts.messages import FinishReason, TokenDelta
from model_workers.native.output_stream import OutputStreams, StreamEnd, merge_deltas
from model_workers.native.scheduler import SeqOutput

WORDS = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 9: "<eos>"}


class WordDetok:
    """Each token id spells one fixed piece of text (enough to exercise the text handling)."""

    def push(self, ids: list[int]) -> str:
        return "".join(WORDS[i] for i in ids)


def out(sid: str, token: int, n: int, reason: FinishReason | None = None) -> SeqOutput:
    return SeqOutput(sid, token, reason, num_prompt_tokens=3, num_output_tokens=n, num_cached_tokens=0)


def drain(stream) -> list[TokenDelta]:
    deltas = []
    while not stream.queue.empty():
        deltas.append(stream.queue.get_nowait())
    return deltas


def test_plain_deltas_then_length_finish():
    streams = OutputStreams()
    s = streams.open("a", WordDetok(), ())
    assert streams.publish([out("a", 1, 1)]) == []
    assert streams.publish([out("a", 2, 2, FinishReason.LENGTH)]) == [StreamEnd("a", by_stop_string=False)]
    d1, d2 = drain(s)
    assert (d1.token_ids, d1.text, d1.finish_reason) == ((1,), "Hel", None)
    assert (d2.token_ids, d2.text, d2.finish_reason) == ((2,), "lo", FinishReason.LENGTH)
    assert (d2.prompt_tokens, d2.completion_tokens) == (3, 2) and s.done and "a" not in streams


def test_stop_string_is_held_across_tokens_then_cut_and_reported():
    streams = OutputStreams()
    s = streams.open("a", WordDetok(), ("", "world"))  # empty stop strings are ignored
    assert streams.publish([out("a", 1, 1), out("a", 2, 2)]) == []
    assert streams.publish([out("a", 3, 3)]) == []  # "wor" may begin "world": held back
    assert streams.publish([out("a", 4, 4)]) == [StreamEnd("a", by_stop_string=True)]
    deltas = drain(s)
    assert [d.text for d in deltas] == ["Hel", "lo", " ", ""]  # "wor" held, then cut
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].token_ids == (4,)


def test_held_text_is_flushed_when_the_output_ends_otherwise():
    streams = OutputStreams()
    s = streams.open("a", WordDetok(), ("world",))
    streams.publish([out("a", 3, 1)])  # " " sent, "wor" held
    assert streams.publish([out("a", 9, 2, FinishReason.STOP)]) == [StreamEnd("a", by_stop_string=False)]
    deltas = drain(s)
    # A stop token adds no text of its own, but what was held for a stop string that never came is sent.
    assert [d.text for d in deltas] == [" ", "wor"] and deltas[-1].finish_reason is FinishReason.STOP


def test_close_sends_one_empty_finish_delta_and_drops_later_outputs():
    streams = OutputStreams()
    a = streams.open("a", WordDetok(), ())
    b = streams.open("b", WordDetok(), ())
    streams.close("a", FinishReason.ABORT)
    streams.close("a", FinishReason.ABORT)  # already ended: nothing more
    streams.close("b", FinishReason.ERROR, "engine step failed: boom")
    assert streams.publish([out("a", 1, 1), out("b", 1, 1)]) == []
    assert drain(a) == [TokenDelta("a", (), "", FinishReason.ABORT)]
    assert drain(b) == [TokenDelta("b", (), "", FinishReason.ERROR, error="engine step failed: boom")]
    assert streams.ids() == []


async def test_a_backlog_is_merged_into_one_delta_up_to_the_finish():
    streams = OutputStreams()
    s = streams.open("a", WordDetok(), ())
    streams.publish([out("a", 1, 1)])
    streams.publish([out("a", 2, 2)])
    streams.publish([out("a", 5, 3, FinishReason.LENGTH)])
    merged = await s.next_delta()
    assert merged == TokenDelta("a", (1, 2, 5), "Hello!", FinishReason.LENGTH, prompt_tokens=3, completion_tokens=3)
    assert merge_deltas(TokenDelta("a", (1,), "x"), TokenDelta("a", (2,), "y", completion_tokens=2)) == TokenDelta(
        "a", (1, 2), "xy", completion_tokens=2
    )
