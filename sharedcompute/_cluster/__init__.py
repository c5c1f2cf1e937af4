"""The cluster (private): the token, and (to come) the head, nodes and their transport."""
