// Drives fabric's control plane with Triton's own NAPI client (npm sdc-clients, class NAPI):
// fabric VLAN -> fabric network -> provision NICs -> list/get -> update -> delete.
// Usage: node napi.js http://127.0.0.1:PORT   (prints "ok <n> checks" and exits 0, or throws)
'use strict';
var assert = require('assert');
var NAPI = require('sdc-clients').NAPI;

var url = process.argv[2];
if (!url) {
    console.error('usage: node napi.js URL');
    process.exit(2);
}
if (process.argv[2] === '--version') {
    console.log(require('sdc-clients/package.json').version);
    process.exit(0);
}
var napi = new NAPI({ url: url, agent: false });
var OWNER = '930896af-bf8c-48d4-885c-6573a94b1853';
var CN1 = '564d1a4c-0000-4000-8000-000000000001';
var CN2 = '564d1a4c-0000-4000-8000-000000000002';
var checks = 0;

function call(method) {
    var args = Array.prototype.slice.call(arguments, 1);
    return new Promise(function (resolve, reject) {
        args.push(function (err, obj) {
            if (err) { reject(err); } else { resolve(obj); }
        });
        napi[method].apply(napi, args);
    });
}

function eq(a, b, what) {
    assert.deepStrictEqual(a, b, what);
    checks++;
}

async function expectError(p, status, code) {
    try {
        await p;
    } catch (err) {
        eq(err.statusCode, status, 'status of ' + code);
        eq(err.restCode || (err.body && err.body.code), code, 'restCode');
        return err;
    }
    throw new Error('expected a ' + code + ' error');
}

async function main() {
    var ping = await call('ping');
    eq(ping.status, 'OK', 'ping');

    var vlan = await call('createFabricVLAN', OWNER, { vlan_id: 42, name: 'napi-client' });
    eq(vlan.vlan_id, 42, 'vlan_id');
    eq(vlan.owner_uuid, OWNER, 'vlan owner');
    assert.ok(Number.isInteger(vlan.vnet_id)); checks++;
    var dup = await expectError(call('createFabricVLAN', OWNER, { vlan_id: 42 }), 422, 'InUse');
    eq(dup.body.errors[0].field, 'vlan_id', 'dup field');
    var vlans = await call('listFabricVLANs', OWNER, {});
    eq(vlans.map(function (v) { return v.vlan_id; }), [42], 'list vlans');
    eq((await call('getFabricVLAN', OWNER, 42, {})).name, 'napi-client', 'get vlan');
    eq((await call('updateFabricVLAN', OWNER, 42, { description: 'via sdc-clients' })).description,
        'via sdc-clients', 'update vlan');

    var net = await call('createFabricNetwork', OWNER, 42,
        { name: 'napi-net', subnet: '10.77.0.0/24', gateway: '10.77.0.1', resolvers: ['10.77.0.53'] });
    eq(net.fabric, true, 'fabric');
    eq(net.subnet, '10.77.0.0/24', 'subnet');
    eq(net.vnet_id, vlan.vnet_id, 'vnet_id');
    eq(net.owner_uuid, OWNER, 'owner');
    var nets = await call('listFabricNetworks', OWNER, 42, {});
    eq(nets.map(function (n) { return n.uuid; }), [net.uuid], 'list networks');
    eq((await call('getFabricNetwork', OWNER, 42, net.uuid, {})).name, 'napi-net', 'get network');

    var nics = [];
    for (var i = 0; i < 3; i++) {
        nics.push(await call('provisionNic', net.uuid, {
            owner_uuid: OWNER, belongs_to_type: 'zone',
            belongs_to_uuid: '11111111-0000-4000-8000-00000000000' + i, cn_uuid: CN1
        }));
    }
    eq(nics.map(function (n) { return n.ip; }), ['10.77.0.2', '10.77.0.3', '10.77.0.4'], 'IPs');
    eq(nics[0].nic_tag, 'sdc_overlay/' + vlan.vnet_id, 'nic_tag');
    eq(nics[0].resolvers, ['10.77.0.53'], 'resolvers');
    var listed = await call('listNics', { network_uuid: net.uuid });
    eq(listed.length, 3, 'listNics');
    var got = await call('getNic', nics[1].mac);
    eq(got.ip, nics[1].ip, 'getNic');
    var upd = await call('updateNic', nics[1].mac, { cn_uuid: CN2, state: 'running' });
    eq(upd.cn_uuid, CN2, 'moved');
    eq(upd.state, 'running', 'state');
    await expectError(call('provisionNic', net.uuid,
        { owner_uuid: OWNER, belongs_to_type: 'zone', belongs_to_uuid: CN1 }), 422, 'InvalidParameters');

    await expectError(call('deleteFabricVLAN', OWNER, 42, {}), 422, 'InUse');
    for (var j = 0; j < nics.length; j++) {
        await call('deleteNic', nics[j].mac, {});
    }
    await expectError(call('getNic', nics[0].mac), 404, 'ResourceNotFound');
    await call('deleteFabricNetwork', OWNER, 42, net.uuid, {});
    await call('deleteFabricVLAN', OWNER, 42, {});
    await expectError(call('getFabricVLAN', OWNER, 42, {}), 404, 'ResourceNotFound');
    console.log('ok ' + checks + ' checks (sdc-clients ' +
        require('sdc-clients/package.json').version + ')');
}

main().then(function () { process.exit(0); }, function (err) {
    console.error('FAILED:', err && (err.stack || err), err && err.body ? JSON.stringify(err.body) : '');
    process.exit(1);
});
