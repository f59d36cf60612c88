"""Networks defined outside medseg, named by import path in the tests (``tests.plugins.tiny_net:build``)."""
