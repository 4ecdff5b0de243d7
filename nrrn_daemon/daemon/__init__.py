"""The acquisition daemon: the loop, arrivals, the reader/model/writer pipeline, recording."""
