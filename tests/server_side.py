"""What tests of fedgin's strategies need to play the server without Flower's runtime."""

from __future__ import annotations


class FakeGrid:
    """The part of Flower's Grid a strategy's ``configure_*`` uses: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids
