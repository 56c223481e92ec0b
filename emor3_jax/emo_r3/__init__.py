"""The EMO-R3 task in one place: the SET prompt, the two reflection questions, and the
Reflective Emotional Reward's named components."""
