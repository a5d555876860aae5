# docker-py's tests/integration/api_network_test.py, the cases that need no container, ported
# to run as one script against fabric's Docker API (DOCKER_HOST, DOCKER_TLS_VERIFY,
# DOCKER_CERT_PATH set by the caller; REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE unset).
# Where fabric answers otherwise by design, the case asserts fabric's answer and says why.
# Prints one line per case; exits 1 if any failed.
import sys
import uuid

import docker
from docker.types import IPAMConfig, IPAMPool

client = docker.from_env().api
tmp_networks = []
failed = []


def random_name():
    return 'dockerpytest_' + uuid.uuid4().hex[:12]


def create_network(*args, **kwargs):
    net_name = random_name()
    net_id = client.create_network(net_name, *args, **kwargs)['Id']
    tmp_networks.append(net_id)
    return (net_name, net_id)


def raises(exc, f, *a, **k):
    try:
        f(*a, **k)
    except exc as e:
        return e
    raise AssertionError('%s did not raise %s' % (f.__name__, exc.__name__))


def test_list_networks():
    client.networks()
    net_name, net_id = create_network()
    networks = client.networks()
    assert net_id in [n['Id'] for n in networks]
    networks_by_name = client.networks(names=[net_name])
    assert [n['Id'] for n in networks_by_name] == [net_id]
    networks_by_partial_id = client.networks(ids=[net_id[:8]])
    assert [n['Id'] for n in networks_by_partial_id] == [net_id]


def test_inspect_network():
    net_name, net_id = create_network()
    net = client.inspect_network(net_id)
    assert net['Id'] == net_id
    assert net['Name'] == net_name
    assert net['Driver'] == 'bridge'
    assert net['Scope'] == 'local'
    assert net['IPAM']['Driver'] == 'default'


def test_create_network_with_ipam_config():
    _, net_id = create_network(
        ipam=IPAMConfig(
            driver='default',
            pool_configs=[
                IPAMPool(
                    subnet="172.28.0.0/16",
                    iprange="172.28.5.0/24",
                    gateway="172.28.5.254",
                    aux_addresses={
                        "a": "172.28.1.5",
                        "b": "172.28.1.6",
                        "c": "172.28.1.7",
                    },
                ),
            ],
        ),
    )
    net = client.inspect_network(net_id)
    ipam = net['IPAM']
    assert ipam.pop('Options', None) is None
    assert ipam['Driver'] == 'default'
    assert ipam['Config'] == [{
        'Subnet': "172.28.0.0/16",
        'IPRange': "172.28.5.0/24",
        'Gateway': "172.28.5.254",
        'AuxiliaryAddresses': {
            "a": "172.28.1.5",
            "b": "172.28.1.6",
            "c": "172.28.1.7",
        },
    }], ipam['Config']


def test_create_network_with_host_driver_fails():
    raises(docker.errors.APIError, client.create_network, random_name(), driver='host')


def test_remove_network():
    net_name, net_id = create_network()
    assert net_name in [n['Name'] for n in client.networks()]
    client.remove_network(net_id)
    assert net_name not in [n['Name'] for n in client.networks()]


def test_create_check_duplicate():
    net_name, net_id = create_network()
    raises(docker.errors.APIError, client.create_network, net_name, check_duplicate=True)
    # By design fabric keeps names unique per account: CheckDuplicate=false is refused too
    # (moby 20.10 would create a second network of the same name).
    e = raises(docker.errors.APIError, client.create_network, net_name, check_duplicate=False)
    assert e.response.status_code == 409, e
    assert 'already exists' in e.explanation, e.explanation


def test_create_internal_networks():
    _, net_id = create_network(internal=True)
    net = client.inspect_network(net_id)
    assert net['Internal'] is True


def test_create_network_with_labels():
    _, net_id = create_network(labels={'com.docker.py.test': 'label'})
    net = client.inspect_network(net_id)
    assert 'Labels' in net
    assert len(net['Labels']) == 1
    assert net['Labels'] == {'com.docker.py.test': 'label'}


def test_create_network_with_labels_wrong_type():
    raises(TypeError, create_network, labels=['com.docker.py.test=label', ])


def test_create_network_ipv6_enabled():
    # By design fabric networks are IPv4 only: refused with 400 (moby creates it).
    e = raises(docker.errors.APIError, create_network,
               enable_ipv6=True, ipam=IPAMConfig(
                   driver='default',
                   pool_configs=[IPAMPool(subnet="2001:389::1/64", iprange="2001:389::0/96",
                                          gateway="2001:389::ffff")]))
    assert e.response.status_code == 400, e
    assert 'IPv6' in e.explanation, e.explanation


def test_create_network_attachable():
    # moby needs a swarm for overlay; every fabric network is an overlay.
    _, net_id = create_network(driver='overlay', attachable=True)
    net = client.inspect_network(net_id)
    assert net['Attachable'] is True
    assert net['Driver'] == 'overlay'


def test_prune_networks():
    net_name, _ = create_network()
    result = client.prune_networks()
    assert net_name in result['NetworksDeleted']


def test_create_network_with_space_in_name():
    net_id = client.create_network('test network')['Id']
    tmp_networks.append(net_id)
    assert 'test network' in [n['Name'] for n in client.networks()]
    assert client.inspect_network('test network')['Id'] == net_id


def test_connect_unknown_container():
    _, net_id = create_network()
    e = raises(docker.errors.NotFound, client.connect_container_to_network, 'nocontainer', net_id)
    assert 'No such container: nocontainer' in e.explanation, e.explanation


def test_inspect_unknown_network():
    e = raises(docker.errors.NotFound, client.inspect_network, 'nosuchnetwork')
    assert e.explanation == 'network nosuchnetwork not found', e.explanation


for name, f in list(globals().items()):
    if name.startswith('test_') and callable(f):
        try:
            f()
            print('ok   ' + name)
        except Exception as e:  # noqa: BLE001 - report every case
            failed.append(name)
            print('FAIL %s: %r' % (name, e))
        finally:
            for n in tmp_networks:
                try:
                    client.remove_network(n)
                except docker.errors.APIError:
                    pass
            del tmp_networks[:]
            client.leave_swarm(force=True)

sys.exit(1 if failed else 0)
