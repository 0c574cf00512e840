"""Network governance: proposals, votes and their tally.

``governance.ballot`` is the cryptography of the secret ballot; it imports only from
``schemas`` and ``streams`` and never from ``destra``.
"""
