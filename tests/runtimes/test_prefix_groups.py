"""prefix_groups: which scored sequences run their first tokens once for all of them."""

from __future__ import annotations

from batchserve.runtimes.base import prefix_groups


def test_sequences_sharing_first_tokens_form_a_group_whatever_their_order():
    first = [[1, 2, 3, 4, 5, 10], [1, 2, 3, 4, 5, 11, 12]]
    second = [[7, 8, 9, 9, 9, 20], [7, 8, 9, 9, 9, 21]]
    sequences = [first[0], second[0], first[1], second[1]]
    groups = prefix_groups(sequences, 4)
    assert sorted((shared, sorted(members)) for shared, members in groups) == [(5, [0, 2]), (5, [1, 3])]


def test_a_sequence_alone_shares_all_of_itself_and_every_index_is_in_one_group():
    sequences = [[5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 4, 8], [5, 6], [3]]
    groups = prefix_groups(sequences, 4)
    assert sorted(index for _, members in groups for index in members) == list(range(5))
    assert (1, [4]) in groups and (4, [2, 1]) in groups
    assert (2, [0]) in groups and (2, [3]) in groups  # fewer than min_shared tokens in common: no group


def test_a_run_is_cut_where_sharing_less_would_rerun_more_than_it_saves():
    long = list(range(100, 120))  # 48 candidates sharing 20 tokens, and one sharing only 4 of them
    candidates = [long + [index] for index in range(48)]
    for stranger in (long[:4] + [999, 998], long[:4] + [50, 51]):  # sorted after them, and before
        groups = prefix_groups([*candidates, stranger], 4)
        assert sorted(groups) == sorted([(20, list(range(48))), (6, [48])])
    # two sequences sharing 18 of their 21 tokens: one group (18 run once) beats two
    assert prefix_groups([long + [1], long[:18] + [2]], 4) == [(18, [1, 0])]


def test_many_sequences_in_a_chain_need_no_deep_recursion():
    chain = [[1] * length for length in range(1, 3001)]  # each shares all of itself with the next
    groups = prefix_groups(chain, 4)
    assert sorted(index for _, members in groups for index in members) == list(range(3000))
