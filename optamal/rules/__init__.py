"""Update rules: pure ``(init, step)`` pairs over one flat parameter vector.

``state = rule.init(theta)``, then ``update, state = rule.step(grad, state, t)`` and
the optimizee moves ``theta = theta - update``. Teachers have no weights; learned
rules (RNNProp, choice) hold weights in an ``nn.Module`` so that autograd flows from
the trajectory into them.
"""
