"""Access control: the one policy decision point of the record server (`decision.decide`)."""
