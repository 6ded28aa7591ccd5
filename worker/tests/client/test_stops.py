"""Stop strings in text that arrives piece by piece: nothing of a stop string is ever handed out."""
from qwen_worker.client.stops import StopStrings


def feed(stops, pieces):
    matcher = StopStrings(stops)
    out = [matcher.push(p) for p in pieces]
    return out, matcher


def test_the_text_ends_before_the_first_stop_string_even_split_over_pieces():
    out, matcher = feed(["END", "\n\n"], ["Hello E", "N", "D and more"])
    assert out == ["Hello ", "", ""] and matcher.hit == 6 and matcher.flush() == ""


def test_a_tail_that_could_begin_a_stop_string_waits_and_goes_out_when_it_does_not():
    out, matcher = feed(["xyz"], ["ab", "x", "yq"])
    assert out == ["ab", "", "xyq"] and matcher.hit is None


def test_the_earliest_of_several_stop_strings_wins_and_the_end_flushes_what_was_held():
    out, _ = feed(["world", "lo"], ["hello world"])
    assert out == ["hel"]
    _, matcher = feed(["<end>"], ["all done <e"])
    assert matcher.flush() == "<e"
